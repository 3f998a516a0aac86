"""The request log's columnar copy: a rotated JSON-lines file's requests as NumPy columns, written at close.

The JSON lines stay the durable record (appended as requests are answered, readable by anything). When the
writer closes a file it also writes ``<same name>.npz`` beside it from the columns it kept in memory for that
file: the same requests, in the same order, with the same numbers (floats rounded to the 6 significant digits
the lines carry, so both copies read back equal). The drift monitor reads the ``.npz`` when one exists and
falls back to the lines otherwise (``components/monitor/columnar.py``): it can count a window's requests from
two small columns and read only the sampled rows, instead of scanning every line.

Why ``.npz`` (a zip of ``.npy`` arrays, NumPy's own documented format) and not Arrow or Parquet: the serving
image has NumPy and no pyarrow (a 55 MB wheel, 170 MB installed, beside a 1.5 GB image), and the writer thread
shares the TorchServe worker with inference. The members are stored uncompressed, so a reader can memory-map
each one and touch only the rows it samples.

Members (``n`` requests, ``k`` float columns):

- ``timestamp_ms`` int64 [n]: milliseconds since the Unix epoch, the instant the line's ``timestamp`` names;
- ``timestamp_bounds`` int64 [2]: its smallest and largest value (a file wholly inside a window is counted
  without reading ``timestamp_ms``);
- ``values`` float64 [n, k], row-major, and ``float_columns`` str [k]: confidence, image features, embedding;
- ``predicted_class`` int64 [n];
- ``model_version`` / ``source`` / ``predicted_label``: int32 codes [n] into ``<name>_names`` str [m];
- ``format`` int64 [1]: ``FORMAT_VERSION``.

A file is written under a temporary name, synced and renamed: a reader sees the whole file or none.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

COLUMNAR_SUFFIX = ".npz"
FORMAT_VERSION = 1
SIGNIFICANT_DIGITS = 6  # what the JSON lines carry (%.6g)
CODED_COLUMNS = ("model_version", "source", "predicted_label")


def round_significant(values: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits, as ``float("%.{digits}g" % x)`` gives them.

    The scale is always an exact power of ten, applied by one multiplication and one division (or the
    reverse), so the result is the float nearest the rounded decimal; non-finite values pass through.
    """
    x = np.asarray(values, dtype=np.float64)
    with np.errstate(all="ignore"):
        magnitude = np.floor(np.log10(np.abs(x)))
        shift = np.where(np.isfinite(magnitude), digits - 1 - magnitude, 0.0)
        up = np.power(10.0, np.maximum(shift, 0.0))  # exact powers of ten (up to 1e22)
        down = np.power(10.0, np.maximum(-shift, 0.0))
        rounded = np.round(x * up / down) * down / up
    return np.where(np.isfinite(x) & (x != 0), rounded, x)


class ColumnBuffer:
    """The columns of every line in one open log file, in line order, to be written as ``.npz`` at close."""

    def __init__(self, float_columns: list[str] | None = None):
        self.float_columns = float_columns
        self.parts: list[dict[str, np.ndarray | list]] = []
        self.rows = 0

    def add(self, block: dict[str, np.ndarray | list], start: int = 0, stop: int | None = None) -> bool:
        """Keep rows ``[start, stop)`` of ``block``; False (and nothing kept) when its float columns differ
        from this file's (a second model with another embedding width): the file then keeps only its lines."""
        if block.get("float_columns") is None:
            return False
        if self.float_columns is None:
            self.float_columns = list(block["float_columns"])
        elif list(block["float_columns"]) != self.float_columns:
            return False
        part = {k: v[start:stop] for k, v in block.items() if k != "float_columns"}
        self.parts.append(part)
        self.rows += len(part["timestamp_ms"])
        return True

    def arrays(self) -> dict[str, np.ndarray]:
        """The members of the ``.npz``."""
        def joined(key: str) -> np.ndarray:
            return np.concatenate([np.asarray(p[key]) for p in self.parts]) if self.parts else np.zeros(0)

        stamps = joined("timestamp_ms").astype(np.int64)
        out = {"format": np.array([FORMAT_VERSION], np.int64), "timestamp_ms": stamps,
               "timestamp_bounds": np.array([stamps.min(), stamps.max()] if len(stamps) else [0, -1], np.int64),
               "values": (np.concatenate([p["values"] for p in self.parts]).astype(np.float64) if self.parts
                          else np.zeros((0, len(self.float_columns or [])))),
               "float_columns": np.array(self.float_columns or [], dtype=str),
               "predicted_class": joined("predicted_class").astype(np.int64)}
        for name in CODED_COLUMNS:
            texts = [t for p in self.parts for t in p[name]]
            names, codes = np.unique(np.array(texts, dtype=str), return_inverse=True) if texts else (
                np.zeros(0, str), np.zeros(0, np.int64))
            out[name] = codes.astype(np.int32)
            out[f"{name}_names"] = names
        return out


def write_columns(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` as an uncompressed ``.npz`` at ``path``, atomically (temporary name, fsync, rename)."""
    path = Path(path)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(staged, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return path
