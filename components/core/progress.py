"""Progress of a long loop, with an ETA: a tqdm bar on a terminal, plain periodic lines elsewhere.

A step's output is a terminal only when someone runs it by hand; under ``mlops run``, in a pod or in a log
file it is a pipe, where a redrawn bar would be hundreds of carriage returns. There the loop prints one line
when it starts, at most one every ``interval_s`` seconds, and one when it ends, each with the ETA, so a log
shows progress without drowning the rest.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

Log = Callable[[str], None]


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """``total`` units of work named ``what`` (e.g. "pretrain epoch"); call ``update(done, detail)`` after each.

    ``log``: where plain lines go (the step's ``print``); ``stream``: the output whose being a terminal selects
    the bar; ``interval_s``: the least time between two plain lines (the last unit always prints); ``quiet``: no
    output at all (e.g. the DDP ranks other than the main one)."""

    def __init__(self, what: str, total: int, log: Log = print, *, stream: TextIO | None = None,
                 interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic, start: int = 0,
                 quiet: bool = False):
        self.what, self.total, self.log, self.interval_s, self.clock = what, max(int(total), 0), log, interval_s, clock
        self.started, self.start, self.last_line = clock(), start, None
        stream = sys.stderr if stream is None else stream
        self.bar, self.quiet = None, quiet
        if not quiet and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=start, desc=what, file=stream, dynamic_ncols=True, leave=True)

    def eta_seconds(self, done: int) -> float | None:
        """Seconds left at the mean pace of the units done in this process (None before the first)."""
        ran = done - self.start
        if ran <= 0:
            return None
        return (self.clock() - self.started) / ran * max(self.total - done, 0)

    def line(self, done: int, detail: str = "") -> str:
        eta = self.eta_seconds(done)
        pace = "" if eta is None else (" done" if done >= self.total else f" ETA {format_seconds(eta)}")
        return f"{self.what} {done}/{self.total}{' ' + detail if detail else ''}{pace}"

    def update(self, done: int, detail: str = "") -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(detail, refresh=False)
            self.bar.refresh()
            if done >= self.total:
                self.close()
            return
        now = self.clock()
        if self.quiet:
            return
        if self.last_line is None or done >= self.total or now - self.last_line >= self.interval_s:
            self.last_line = now
            self.log(self.line(done, detail))

    def close(self, detail: str = "") -> None:
        """End early (e.g. early stopping): the bar closes; plain output says where it stopped."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif detail and not self.quiet:
            self.log(f"{self.what} stopped: {detail}")
