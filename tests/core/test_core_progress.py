"""Progress lines: an ETA from the pace so far, at most one plain line per interval, a bar only on a terminal."""

from __future__ import annotations

import io

import pytest

from components.core.progress import Progress, format_seconds


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (59.4, "0:59"), (61, "1:01"), (3725, "1:02:05")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_plain_lines_are_periodic_with_an_eta_and_the_last_always_prints():
    clock, lines = Clock(), []
    progress = Progress("pretrain epoch", 10, lines.append, stream=io.StringIO(), interval_s=5.0, clock=clock)
    for epoch in range(1, 11):
        clock.now += 2.0  # 2 s an epoch
        progress.update(epoch, f"loss {1 / epoch:.2f}")
    # epoch 1 (first), then one each time 5 s passed (epochs 4, 7, 10), and the last
    assert lines == ["pretrain epoch 1/10 loss 1.00 ETA 0:18", "pretrain epoch 4/10 loss 0.25 ETA 0:12",
                     "pretrain epoch 7/10 loss 0.14 ETA 0:06", "pretrain epoch 10/10 loss 0.10 done"]


def test_a_resumed_loop_paces_only_what_ran_here():
    clock, lines = Clock(), []
    progress = Progress("finetune epoch", 10, lines.append, stream=io.StringIO(), clock=clock, start=8)
    clock.now += 3.0
    progress.update(9)
    assert lines == ["finetune epoch 9/10 ETA 0:03"]


def test_early_stop_says_where_it_stopped_and_quiet_prints_nothing():
    lines = []
    progress = Progress("finetune epoch", 40, lines.append, stream=io.StringIO())
    progress.update(1)
    progress.close("early stop after epoch 12")
    assert lines[-1] == "finetune epoch stopped: early stop after epoch 12"
    quiet = []
    silent = Progress("pretrain epoch", 3, quiet.append, stream=Terminal(), quiet=True)
    silent.update(1)
    silent.update(3)
    silent.close("x")
    assert quiet == [] and silent.bar is None


def test_a_terminal_gets_a_bar_instead_of_lines():
    terminal, lines = Terminal(), []
    progress = Progress("pretrain epoch", 3, lines.append, stream=terminal)
    for epoch in (1, 2, 3):
        progress.update(epoch, "loss 0.5")
    assert lines == []  # nothing printed line by line
    drawn = terminal.getvalue()
    assert "pretrain epoch" in drawn and "3/3" in drawn and "loss 0.5" in drawn
    assert progress.bar is None  # closed at the end
