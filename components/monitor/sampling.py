"""Reading one time window of the serving request log fast, and sampling it with a stated error bound.

The request log is JSON lines (``serving/request_log.py`` writes them), and each closed file
has a columnar copy beside it (``.npz``), read instead of its lines where it exists
(``columnar.py``: counted from two columns, only the drawn rows read). Parsing every
line of a large window with ``json`` or pyarrow is far over the time budget (see
docs/benchmarks.md), and the drift tests do not need every line, so this module reads
only what it needs:

1. **Index, don't parse.** Each file is memory-mapped; numpy finds every newline
   (one vectorised pass). Every line the log writer produced
   starts ``{"timestamp":"2026-01-01T12:00:00.123+00:00","model_version":"…"``
   (compact or with spaces after the separators), so the timestamp and the model
   version sit at fixed byte offsets: they are gathered for all lines at once and
   compared as fixed-width strings (same format, UTC, so byte order = time order).
   That gives the exact number of requests in the window and of the model version,
   without parsing. Lines of any other layout (other writers, ``Z`` suffixes,
   damaged lines, a half-written last line) are parsed one by one with ``json``,
   bad lines skipped and counted.
2. **Sample with a bound.** If the window holds more than ``FULL_READ_FACTOR`` x n
   lines, ``n`` of them are drawn uniformly *with replacement* (by line index, so
   long and short lines are equally likely) and only those are parsed. Drawn lines
   that fail the source filter or do not parse are rejected and drawn again, which
   keeps the sample uniform over the selected, readable requests.

The bound (Dvoretzky-Kiefer-Wolfowitz, with Massart's constant): for n i.i.d. draws
from the window, whose empirical CDF per feature is F_W, the sample's empirical CDF
F_n satisfies  P(sup_x |F_n(x) - F_W(x)| > eps) <= 2 exp(-2 n eps^2).  With
n = ceil(ln(2/alpha) / (2 eps^2)) that probability is at most alpha. Because the
Kolmogorov-Smirnov statistic is a sup-distance between CDFs, the triangle inequality
gives, per feature, |KS(reference, sample) - KS(reference, whole window)| <= eps with
probability >= 1 - alpha. Default eps = 0.02, alpha = 0.01: n = 6,623 rows, whatever
the window size. The same bound holds for the share of each predicted class (the
class CDF), so each class share is within 2 eps. ``tests/monitor/test_monitor_sampling.py``
checks the rate empirically.

The sample is seeded from (model version, window), so the same window gives the
same sample, verdict and report on every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from components.core.names import REQUEST_LOG_MAX_AGE_ENV as MAX_AGE_ENV
from components.monitor.columnar import COLUMNAR_SUFFIX, ColumnarFile, ColumnarParts, millis

DEFAULT_EPSILON = 0.02  # sup-distance between the sample's and the window's CDF, per feature
DEFAULT_ALPHA = 0.01  # probability that the bound is exceeded
FULL_READ_FACTOR = 4  # windows of at most 4n lines are read whole: sampling would repeat rows
TIMESTAMP_WIDTH = 29  # 2026-01-01T12:00:00.123+00:00, what isoformat(timespec="milliseconds") writes in UTC
# (opening bytes, model_version key) for the two JSON layouts: json.dumps with separators=(",", ":") and the default.
FAST_LAYOUTS = (
    (b'{"timestamp":"', b',"model_version":"'),
    (b'{"timestamp": "', b', "model_version": "'),
)
# requests-<host>-<pid>-<UTC start>-<seq>.jsonl, as serving/request_log.py names its rotated files, and .npz for
# the columnar copy it writes beside a file when closing it (read instead of the lines: columnar.py)
LOG_FILE_NAME = re.compile(r"requests-.+-\d+-(?P<stamp>\d{8}T\d{6}Z)-\d+\.(?:jsonl|npz)")
LOG_SUFFIXES = (".jsonl", COLUMNAR_SUFFIX)
# A rotated file holds lines answered from shortly before its start (its name) until its last write
# (its modification time: a local file's mtime, an object's upload time). Files last written more
# than FILE_SPAN_SLACK before the window, or started FILE_START_SLACK after its end, cannot hold its
# requests: not read, nor downloaded. Without a modification time, the writer's rotation age bounds
# the file's span (serving.request_log_max_age_s, $KFP_MLOPS_REQUEST_LOG_MAX_AGE_S; default 1 h).
FILE_SPAN_SLACK = timedelta(minutes=10)
FILE_START_SLACK = timedelta(minutes=10)
_CHUNK = 1 << 24  # newline scan in 16 MiB chunks: cache-friendly, bounded temporary memory


# ---------------------------------------------------------------------------
# The bound


def dkw_sample_size(epsilon: float = DEFAULT_EPSILON, alpha: float = DEFAULT_ALPHA) -> int:
    """Rows needed so the sample's per-feature CDF is within ``epsilon`` of the window's with prob. 1 - alpha."""
    if not 0.0 < epsilon < 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"sampling needs 0 < epsilon < 1 and 0 < alpha < 1, got epsilon={epsilon}, alpha={alpha}")
    return math.ceil(math.log(2.0 / alpha) / (2.0 * epsilon**2))


def dkw_epsilon(n: int, alpha: float = DEFAULT_ALPHA) -> float:
    """The DKW bound achieved by ``n`` i.i.d. rows: sup|F_n - F_W| <= this with probability 1 - alpha."""
    if n <= 0:
        return 1.0
    return math.sqrt(math.log(2.0 / alpha) / (2.0 * n))


def window_seed(model_version: str | None, since: datetime | None, until: datetime | None) -> int:
    """A sampling seed that depends only on (model version, window): reruns draw the same rows."""
    key = f"{model_version}|{_iso(since)}|{_iso(until)}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16)


# ---------------------------------------------------------------------------
# Times


def parse_utc(value: Any) -> datetime:
    """ISO-8601 string (``Z`` allowed) or datetime -> aware UTC datetime; naive means UTC."""
    ts = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else parse_utc(value).isoformat(timespec="microseconds")


def _timestamp_key(value: datetime) -> bytes:
    """The log's timestamp text for the first millisecond at or after ``value``.

    Log times have millisecond precision, so ``t >= since`` <=> ``t >= ceil_ms(since)``
    and ``t < until`` <=> ``t < ceil_ms(until)``: both compare as fixed-width bytes.
    """
    t = parse_utc(value)
    if t.microsecond % 1000:
        t += timedelta(microseconds=1000 - t.microsecond % 1000)
    return t.isoformat(timespec="milliseconds").encode()


# ---------------------------------------------------------------------------
# Finding the log files


def list_log_files(log_dir: str | Path, since: datetime | None = None, until: datetime | None = None,
                   cache_dir: str | Path | None = None, max_file_age_s: float | None = None) -> list[Path]:
    """The ``*.jsonl`` files of a local directory or an ``s3://`` prefix, skipping rotated files outside the window.

    Where a file has a columnar copy (``<name>.npz``, written when it was closed), the copy is listed instead.

    ``max_file_age_s`` is the writer's rotation age (``serving.request_log_max_age_s``; None:
    ``$KFP_MLOPS_REQUEST_LOG_MAX_AGE_S``, else 1 h). S3 objects are downloaded into
    ``cache_dir`` (default: a per-prefix directory in the temp dir) once: rotated log files
    are uploaded when closed and never change, so a cached copy stays valid. Raises
    FileNotFoundError, saying what to check, when the directory is missing.
    """
    lo = parse_utc(since) if since is not None else None
    hi = parse_utc(until) if until is not None else None
    location = str(log_dir)
    if location.startswith("s3://"):
        from components.core import blobs

        listed = blobs.Storage().list_modified(location.rstrip("/") + "/")
        uris = _prefer_columnar([u for u, modified in listed if u.endswith(LOG_SUFFIXES)
                                 and _may_overlap(u.rsplit("/", 1)[-1], lo, hi, max_file_age_s, modified)])
        cache = Path(cache_dir) if cache_dir else Path(os.environ.get("TMPDIR", "/tmp")) / (
            "kfp-mlops-log-cache-" + hashlib.sha256(location.encode()).hexdigest()[:12])
        files = []
        for uri in uris:
            local = cache / uri[len(location.rstrip("/")) + 1:].replace("/", "__")
            if not local.is_file():
                blobs.get_file(uri, local)
            files.append(local)
        return sorted(files)
    path = Path(location)
    if not path.is_dir():
        raise FileNotFoundError(
            f"request log directory {path} does not exist: check 'request_log_dir' in the deployment "
            "record, and that the server has handled at least one request"
        )
    return sorted(Path(p) for p in _prefer_columnar([str(p) for p in path.iterdir() if p.name.endswith(LOG_SUFFIXES)])
                  if _may_overlap(Path(p).name, lo, hi, max_file_age_s, _modified(Path(p))))


def _prefer_columnar(names: list[str]) -> list[str]:
    """Drop each ``.jsonl`` whose ``.npz`` copy is listed too: the same requests, read faster."""
    copies = {n[:-len(COLUMNAR_SUFFIX)] for n in names if n.endswith(COLUMNAR_SUFFIX)}
    return [n for n in names if not (n.endswith(".jsonl") and n[:-len(".jsonl")] in copies)]


def _modified(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    except OSError:
        return None


def _may_overlap(name: str, lo: datetime | None, hi: datetime | None, max_file_age_s: float | None = None,
                 modified: datetime | None = None) -> bool:
    """Whether a log file can hold lines of [lo, hi); files not named by the rotating writer always can."""
    match = LOG_FILE_NAME.fullmatch(name)
    if match is None:
        return True
    start = datetime.strptime(match["stamp"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    if hi is not None and start >= hi + FILE_START_SLACK:
        return False
    if lo is None:
        return True
    if modified is not None:
        return modified >= lo - FILE_SPAN_SLACK
    return start >= lo - _file_span(max_file_age_s)


def _file_span(max_file_age_s: float | None) -> timedelta:
    if max_file_age_s is None:
        try:
            max_file_age_s = float(os.environ.get(MAX_AGE_ENV) or 3600.0)
        except ValueError:
            max_file_age_s = 3600.0
    return timedelta(seconds=max_file_age_s) + FILE_SPAN_SLACK


# ---------------------------------------------------------------------------
# Indexing the lines of a window


@dataclass
class WindowIndex:
    """Where the requests of one window are: byte ranges of unparsed lines plus records parsed on the way."""

    buffers: list[Any]  # one uint8 array (over an mmap) per file
    line_file: np.ndarray  # [M] file index of each indexed line
    line_start: np.ndarray  # [M] byte offsets
    line_end: np.ndarray  # [M] byte offset of the newline
    parsed: list[dict]  # records of the window read on the slow path (other layouts)
    columnar: ColumnarParts = field(default_factory=ColumnarParts)  # rows of the window in columnar copies
    files: int = 0
    rows_in_window: int = 0  # every request of the window, any model version
    bad_lines: int = 0
    partial_lines: int = 0
    _handles: list[Any] = field(default_factory=list, repr=False)

    @property
    def size(self) -> int:
        """Requests of the window and the model version: the population that is sampled.

        Numbered: the indexed lines, then the columnar rows, then the records parsed on the way."""
        return len(self.line_start) + self.columnar.size + len(self.parsed)

    def records(self, ids: np.ndarray) -> list[dict | None]:
        """The records at population positions ``ids``, in that order; None for a line that does not parse.
        Records of the slow path are the index's own dicts: copy one before changing it."""
        ids = np.asarray(ids, np.int64)
        n_fast, n_col = len(self.line_start), self.columnar.size
        out: list[dict | None] = [None] * len(ids)
        for k in np.flatnonzero(ids < n_fast).tolist():
            out[k] = _parse_record(self.line(int(ids[k])))
        in_columns = np.flatnonzero((ids >= n_fast) & (ids < n_fast + n_col))
        if len(in_columns):
            for k, record in zip(in_columns.tolist(), self.columnar.records(ids[in_columns] - n_fast)):
                out[k] = record
        for k in np.flatnonzero(ids >= n_fast + n_col).tolist():
            out[k] = self.parsed[int(ids[k]) - n_fast - n_col]
        return out

    def line(self, i: int) -> bytes:
        f = int(self.line_file[i])
        return self.buffers[f][int(self.line_start[i]):int(self.line_end[i])].tobytes()

    def close(self) -> None:
        self.buffers = []
        self.columnar.close()
        for handle in self._handles:
            try:
                handle.close()
            except (BufferError, ValueError):  # a view is still alive; the GC closes it
                pass
        self._handles = []


def _newlines(buf: np.ndarray) -> np.ndarray:
    parts = [np.flatnonzero(buf[s:s + _CHUNK] == 10) + s for s in range(0, len(buf), _CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _gather(buf: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
    """``[len(positions), width]`` bytes starting at each position (``positions + width <= len(buf)``).

    Indexing a sliding-window view copies each row in one go, faster than a fancy index of offsets.
    """
    return np.lib.stride_tricks.sliding_window_view(buf, width)[positions]


# Byte-wise lower and upper bounds of YYYY-MM-DDTHH:MM:SS.mmm+00:00: digits where digits go, fixed characters elsewhere.
_TS_LOW = np.frombuffer(b"0000-00-00T00:00:00.000+00:00", np.uint8)
_TS_HIGH = np.frombuffer(b"9999-99-99T99:99:99.999+00:00", np.uint8)


def _well_formed_timestamps(ts: np.ndarray) -> np.ndarray:
    """Rows of ``[N, 29]`` bytes that read YYYY-MM-DDTHH:MM:SS.mmm+00:00 (so byte order is time order)."""
    return ((ts >= _TS_LOW) & (ts <= _TS_HIGH)).all(axis=1)


def _parse_record(line: bytes) -> dict | None:
    """One log line -> record with a UTC ``timestamp``; None if it is not a JSON object with a valid timestamp."""
    try:
        record = json.loads(line)
        if not isinstance(record, dict):
            return None
        record["timestamp"] = parse_utc(record["timestamp"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return record


def index_window(files: list[Path], since: datetime | None = None, until: datetime | None = None,
                 model_version: str | None = None) -> WindowIndex:
    """Index the lines of ``files`` in ``[since, until)`` of ``model_version`` (None: any) without parsing them."""
    lo = _timestamp_key(since) if since is not None else None
    hi = _timestamp_key(until) if until is not None else None
    lo_dt = parse_utc(since) if since is not None else None
    hi_dt = parse_utc(until) if until is not None else None
    version_bytes = None
    if model_version is not None:
        encoded = json.dumps(str(model_version))
        # Versions JSON escapes differently from their text go through the slow path (never in practice).
        version_bytes = (encoded[1:-1] + '"').encode() if encoded[1:-1] == str(model_version) else None
    index = WindowIndex(buffers=[], line_file=np.zeros(0, np.int64), line_start=np.zeros(0, np.int64),
                        line_end=np.zeros(0, np.int64), parsed=[], files=len(files))
    files_idx, starts_all, ends_all = [], [], []

    lo_ms, hi_ms = millis(lo), millis(hi)
    for f_i, path in enumerate(files):
        if path.name.endswith(COLUMNAR_SUFFIX):
            index.buffers.append(np.zeros(0, np.uint8))
            part = ColumnarFile(path)
            in_window, selection = part.select(lo_ms, hi_ms, None if model_version is None else str(model_version))
            index.rows_in_window += in_window
            index.columnar.add(part, selection)
            continue
        size = path.stat().st_size
        if size == 0:
            index.buffers.append(np.zeros(0, np.uint8))
            continue
        handle = open(path, "rb")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        index._handles += [mapped, handle]
        buf = np.frombuffer(mapped, np.uint8)
        index.buffers.append(buf)
        nl = _newlines(buf)
        starts = np.empty(len(nl), np.int64)
        if len(nl):
            starts[0] = 0
            starts[1:] = nl[:-1] + 1
        ends = nl.astype(np.int64)
        lengths = ends - starts
        slow = np.zeros(len(nl), bool)
        fast_keep = np.zeros(len(nl), bool)
        undecided = lengths > 0  # empty lines are skipped silently
        # The 14th byte tells the layouts apart ('"' compact, ' ' spaced): each line is gathered at most once.
        layout_byte = buf[np.minimum(starts + 13, size - 1)]
        for opening, version_key in FAST_LAYOUTS:
            p = len(opening)
            # One gather per line: opening, timestamp and closing quote, then (with a version) its key and value.
            width = p + TIMESTAMP_WIDTH + 1 + (len(version_key) + len(version_bytes) if version_bytes else 0)
            cand = np.flatnonzero(undecided & (layout_byte == opening[13]) & (lengths >= p + TIMESTAMP_WIDTH + 1)
                                  & (starts + width <= size))
            if len(cand) == 0:
                continue
            head = _gather(buf, starts[cand], width)
            good = (head[:, :p] == np.frombuffer(opening, np.uint8)).all(axis=1)
            good &= _well_formed_timestamps(head[:, p:p + TIMESTAMP_WIDTH]) & (head[:, p + TIMESTAMP_WIDTH] == ord('"'))
            cand, head = cand[good], head[good]
            undecided[cand] = False  # this layout decides these lines; the rest try the next layout / slow path
            keys = np.ascontiguousarray(head[:, p:p + TIMESTAMP_WIDTH]).view(f"S{TIMESTAMP_WIDTH}").ravel()
            in_window = np.ones(len(cand), bool)
            if lo is not None:
                in_window &= keys >= lo
            if hi is not None:
                in_window &= keys < hi
            cand, head = cand[in_window], head[in_window]
            if model_version is None:
                index.rows_in_window += len(cand)
                fast_keep[cand] = True
                continue
            if version_bytes is None:
                slow[cand] = True  # counted on the slow path
                continue
            # A line shorter than the gather ends in its newline inside the compared bytes: no false match.
            at = p + TIMESTAMP_WIDTH + 1
            k = len(version_key)
            has_key = (head[:, at:at + k] == np.frombuffer(version_key, np.uint8)).all(axis=1)
            same = has_key & (head[:, at + k:] == np.frombuffer(version_bytes, np.uint8)).all(axis=1)
            index.rows_in_window += int(has_key.sum())
            fast_keep[cand[same]] = True
            slow[cand[~has_key]] = True  # another field order: parse it (counted on the slow path)
        slow |= undecided
        keep = np.flatnonzero(fast_keep)
        files_idx.append(np.full(len(keep), f_i, np.int64))
        starts_all.append(starts[keep])
        ends_all.append(ends[keep])

        lines = [(int(starts[i]), int(ends[i]), False) for i in np.flatnonzero(slow)]
        if size and buf[-1] != 10:  # an unterminated last line: maybe a request still being written
            lines.append((int(ends[-1]) + 1 if len(ends) else 0, size, True))
        for start, end, unterminated in lines:
            raw = buf[start:end].tobytes()
            if not raw.strip():
                continue
            record = _parse_record(raw)
            if record is None:
                if unterminated:
                    index.partial_lines += 1
                else:
                    index.bad_lines += 1
                continue
            t = record["timestamp"]
            if (lo_dt is not None and t < lo_dt) or (hi_dt is not None and t >= hi_dt):
                continue
            index.rows_in_window += 1
            if model_version is None or str(record.get("model_version")) == str(model_version):
                index.parsed.append(record)

    if files_idx:
        index.line_file = np.concatenate(files_idx)
        index.line_start = np.concatenate(starts_all)
        index.line_end = np.concatenate(ends_all)
    return index


# ---------------------------------------------------------------------------
# Reading (all of) the window, or a sample of it


@dataclass
class WindowSample:
    """The requests a drift test uses, and how they were chosen."""

    frame: pd.DataFrame  # one row per request, ``timestamp`` as UTC datetimes, sorted by time
    files: int
    rows_in_window: int  # requests in [since, until), any model version or source (exact)
    rows_of_version: int  # ... of the model version (exact)
    rows_selected: int  # ... also of the wanted sources: exact when read whole, estimated when sampled
    sampled: bool
    draws: int  # lines drawn (sampled) or read (whole)
    seed: int | None
    epsilon: float  # the DKW bound the rows achieve (0 when the window was read whole)
    alpha: float
    bad_lines: int
    partial_lines: int

    def stats(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "rows_in_window": self.rows_in_window,
            "rows_of_version": self.rows_of_version,
            "rows_selected": self.rows_selected,
            "rows_selected_estimated": self.sampled,
            "bad_lines": self.bad_lines,
            "partial_lines": self.partial_lines,
        }

    def sampling(self) -> dict[str, Any]:
        """What the verdict says about sampling: how many rows, drawn how, with which guarantee."""
        return {
            "sampled": self.sampled,
            "rows": len(self.frame),
            "window_rows": self.rows_selected,
            "draws": self.draws,
            "method": ("uniform over the window's lines, with replacement; rejected draws (other source, "
                       "unreadable) drawn again" if self.sampled else "whole window"),
            "seed": self.seed,
            "epsilon": round(self.epsilon, 6),
            "alpha": self.alpha,
            "bound": ("DKW: per feature, sup|F_sample - F_window| <= epsilon, so the KS statistic differs from "
                      "the whole window's by at most epsilon, with probability >= 1 - alpha"
                      if self.sampled else "exact: every request of the window was read"),
        }


def _frame(records: list[dict]) -> pd.DataFrame:
    from components.core.features import FEATURE_COLUMNS

    df = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=["timestamp", *FEATURE_COLUMNS])
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
    return df.sort_values("timestamp", kind="stable").reset_index(drop=True)


def read_window(log_dir: str | Path, since: datetime | None = None, until: datetime | None = None,
                model_version: str | None = None, keep: Callable[[dict], bool] | None = None,
                epsilon: float | None = DEFAULT_EPSILON, alpha: float = DEFAULT_ALPHA, seed: int | None = None,
                cache_dir: str | Path | None = None, max_file_age_s: float | None = None) -> WindowSample:
    """The requests of ``[since, until)`` and ``model_version`` that ``keep`` accepts, whole or sampled.

    ``epsilon`` None reads the whole window. Otherwise windows of more than
    ``FULL_READ_FACTOR * dkw_sample_size(epsilon, alpha)`` lines are sampled down to that
    many rows (see the module docstring for the bound). ``seed`` None derives it from
    (model version, window), so the same window always gives the same rows.
    """
    files = list_log_files(log_dir, since, until, cache_dir=cache_dir, max_file_age_s=max_file_age_s)
    index = index_window(files, since, until, model_version)
    try:
        return read_index(index, keep, epsilon, alpha,
                           window_seed(model_version, since, until) if seed is None else seed)
    finally:
        index.close()


def read_index(index: WindowIndex, keep: Callable[[dict], bool] | None = None, epsilon: float | None = DEFAULT_EPSILON,
               alpha: float = DEFAULT_ALPHA, seed: int = 0) -> WindowSample:
    """Read an indexed window whole, or draw the sample (see ``read_window``); the index stays open."""
    keep = keep or (lambda record: True)
    population = index.size
    target = dkw_sample_size(epsilon, alpha) if epsilon is not None else None
    bad = 0

    def whole() -> WindowSample:
        records, unreadable = [], 0
        for start in range(0, population, 1 << 16):  # in blocks: bounded temporaries besides the records kept
            for record in index.records(np.arange(start, min(population, start + (1 << 16)))):
                if record is None:
                    unreadable += 1
                elif keep(record):
                    records.append(record)
        return WindowSample(frame=_frame(records), files=index.files, rows_in_window=index.rows_in_window,
                            rows_of_version=population, rows_selected=len(records), sampled=False,
                            draws=population, seed=None, epsilon=0.0, alpha=alpha,
                            bad_lines=index.bad_lines + unreadable, partial_lines=index.partial_lines)

    if target is None or population <= FULL_READ_FACTOR * target:
        return whole()

    rng = np.random.default_rng(seed)
    records: list[dict] = []
    draws = rejected = 0
    while len(records) < target:
        if draws >= population // 2:  # most draws rejected: reading everything is cheaper and exact
            return whole()
        batch = rng.integers(0, population, size=max(256, target - len(records)))
        for record in index.records(batch):
            draws += 1
            if record is None:
                bad += 1
            elif keep(record):
                records.append(dict(record))
                if len(records) == target:
                    break
                continue
            rejected += 1
    accepted_share = len(records) / draws
    return WindowSample(frame=_frame(records), files=index.files, rows_in_window=index.rows_in_window,
                        rows_of_version=population, rows_selected=round(population * accepted_share), sampled=True,
                        draws=draws, seed=seed, epsilon=dkw_epsilon(len(records), alpha), alpha=alpha,
                        bad_lines=index.bad_lines + round(population * bad / draws),
                        partial_lines=index.partial_lines)
