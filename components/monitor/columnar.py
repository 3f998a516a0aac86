"""Reading the request log's columnar copies: count a window from two columns, read only the sampled rows.

The serving writer closes each rotated JSON-lines file with a ``.npz`` copy beside it (``serving/request_columns.py``
describes the members). A ``.npz`` is a zip of ``.npy`` arrays; the writer stores them uncompressed, so each member
is a plain array at a fixed offset of the file, and row ``i`` of it at ``offset + i * row_bytes``. ``np.load`` would
read every member it is asked for whole; here the zip's local header gives the offset and NumPy's ``.npy`` header
the dtype and shape (about twenty lines on top of two documented formats, no parser of our own), and only what is
needed is read: a file wholly inside the window is counted from its ``timestamp_bounds``, a file the window cuts
from its ``timestamp_ms``, and the sample reads its drawn rows one ``pread`` each. The cost follows the sample and
the number of files, not the bytes logged, and so does the memory (a memory map would do the same reads, but the
kernel maps 64 KB around every touched row into the process: 400 MB for one sample).
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

COLUMNAR_SUFFIX = ".npz"
FORMAT_VERSION = 1
CODED_COLUMNS = ("model_version", "source", "predicted_label")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ZIP_LOCAL_HEADER = 30  # bytes before the member's name and extra field
_NPY_HEADER_MAX = 4096  # NumPy pads its header to a multiple of 64 bytes; ours are ~130


class _Member:
    """Where one ``.npy`` member's array lies in the file: offset, dtype, shape."""

    def __init__(self, offset: int, dtype: np.dtype, shape: tuple, fortran: bool):
        self.offset, self.dtype, self.shape, self.fortran = offset, dtype, shape, fortran
        self.rows = shape[0] if shape else 1
        self.row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64)) if shape else dtype.itemsize


def _members(fd: int, path: Path) -> dict[str, _Member]:
    """Every ``.npy`` member of a stored (uncompressed) zip: where its data starts, its dtype and shape."""
    out = {}
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    for info in infos:
        if not info.filename.endswith(".npy"):
            continue
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path}: member {info.filename} is compressed; the request log writes them stored")
        name_len, extra_len = struct.unpack("<HH", os.pread(fd, _ZIP_LOCAL_HEADER, info.header_offset)[26:30])
        start = info.header_offset + _ZIP_LOCAL_HEADER + name_len + extra_len
        header = io.BytesIO(os.pread(fd, min(info.file_size, _NPY_HEADER_MAX), start))
        version = np.lib.format.read_magic(header)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(header)
        if dtype.hasobject:
            raise ValueError(f"{path}: member {info.filename} holds Python objects; refusing to unpickle it")
        out[info.filename[:-4]] = _Member(start + header.tell(), dtype, shape, fortran)
    return out


class ColumnarFile:
    """One ``.npz`` copy of a rotated log file. Small members are read at once; a column is read whole only
    where a window needs all of it (``timestamp_ms`` of a file the window cuts), and the sampled rows one by
    one with ``pread``: nothing is memory-mapped, so the process holds only the bytes it asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._members = _members(self._fd, self.path)
            version = self.whole("format")
            if int(version[0]) != FORMAT_VERSION:
                raise ValueError(f"format {int(version[0])}, not {FORMAT_VERSION}")
            self.float_columns = [str(c) for c in self.whole("float_columns")]
            self.names = {n: self.whole(f"{n}_names") for n in CODED_COLUMNS}
            self.bounds = self.whole("timestamp_bounds") if "timestamp_bounds" in self._members else None
            self.rows = self._members["timestamp_ms"].rows
            for name in ("values", "predicted_class", *CODED_COLUMNS):
                if self._members[name].rows != self.rows:
                    raise ValueError(f"column {name} has {self._members[name].rows} rows, not {self.rows}")
        except (ValueError, KeyError, zipfile.BadZipFile, struct.error, OSError) as err:
            self.close()
            raise ValueError(f"request log columnar file {self.path} is unreadable ({err}); delete it to read "
                             f"the JSON lines beside it ({self.path.with_suffix('.jsonl').name}) instead") from None

    def whole(self, name: str) -> np.ndarray:
        """One member, read whole."""
        m = self._members[name]
        count = int(np.prod(m.shape, dtype=np.int64))
        data = os.pread(self._fd, count * m.dtype.itemsize, m.offset)
        if len(data) != count * m.dtype.itemsize:
            raise ValueError(f"member {name} is cut short")
        return np.frombuffer(data, m.dtype, count).reshape(m.shape, order="F" if m.fortran else "C")

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of one member: read one by one, or whole when they are many."""
        m = self._members[name]
        if m.fortran and len(m.shape) > 1:
            return self.whole(name)[rows]
        if len(rows) * 16 > m.rows:
            return self.whole(name)[rows]
        unique, back = np.unique(rows, return_inverse=True)
        data = b"".join(os.pread(self._fd, m.row_bytes, m.offset + int(r) * m.row_bytes) for r in unique.tolist())
        return np.frombuffer(data, m.dtype).reshape((len(unique), *m.shape[1:]))[back]

    def select(self, lo_ms: int | None, hi_ms: int | None, model_version: str | None) -> tuple[int, slice | np.ndarray]:
        """(requests in ``[lo_ms, hi_ms)`` of any version, the rows also of ``model_version``: a slice or indices)."""
        mask = None
        bounds = self.bounds
        inside = bounds is not None and (lo_ms is None or bounds[0] >= lo_ms) and (hi_ms is None or bounds[1] < hi_ms)
        ts = None if inside or (lo_ms is None and hi_ms is None) else self.whole("timestamp_ms")
        if lo_ms is not None and not inside:
            mask = ts >= lo_ms
        if hi_ms is not None and not inside:
            mask = ts < hi_ms if mask is None else mask & (ts < hi_ms)
        in_window = self.rows if mask is None else int(np.count_nonzero(mask))
        names = self.names["model_version"]
        if model_version is not None and not (len(names) == 1 and names[0] == model_version):
            hits = np.flatnonzero(names == model_version)
            if len(hits) == 0:
                return in_window, np.zeros(0, np.int64)
            same = self.whole("model_version") == hits[0]
            mask = same if mask is None else mask & same
        if mask is None:
            return in_window, slice(0, self.rows)
        if in_window == self.rows and mask is not None and mask.all():
            return in_window, slice(0, self.rows)
        return in_window, np.flatnonzero(mask)

    def records(self, rows: np.ndarray) -> list[dict]:
        """The requests at ``rows`` as the dicts a JSON line parses to (``timestamp`` a UTC datetime)."""
        rows = np.asarray(rows, np.int64)
        stamps = self.take("timestamp_ms", rows).tolist()
        versions, sources, labels = (self.names[n][self.take(n, rows)].tolist() for n in CODED_COLUMNS)
        classes = self.take("predicted_class", rows).tolist()
        values = self.take("values", rows).tolist()
        names = self.float_columns
        return [{"timestamp": _EPOCH + timedelta(milliseconds=ms), "model_version": v, "source": s,
                 "predicted_class": k, "predicted_label": label, **dict(zip(names, floats))}
                for ms, v, s, k, label, floats in zip(stamps, versions, sources, classes, labels, values)]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def millis(key: bytes | None) -> int | None:
    """A log timestamp key (``_timestamp_key`` in ``sampling``: ISO text, ms precision) as ms since the epoch."""
    if key is None:
        return None
    return (datetime.fromisoformat(key.decode()) - _EPOCH) // timedelta(milliseconds=1)


class ColumnarParts:
    """The selected rows of a window's columnar files, numbered ``0 .. size - 1`` in file order."""

    def __init__(self):
        self.files: list[ColumnarFile] = []
        self.selections: list[slice | np.ndarray] = []
        self.offsets = [0]

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def add(self, part: ColumnarFile, selection: slice | np.ndarray) -> None:
        count = selection.stop - selection.start if isinstance(selection, slice) else len(selection)
        if count == 0:
            part.close()
            return
        self.files.append(part)
        self.selections.append(selection)
        self.offsets.append(self.offsets[-1] + count)

    def records(self, ids: np.ndarray) -> list[dict]:
        """The records at population positions ``ids`` (any order, repeats allowed), in that order."""
        ids = np.asarray(ids, np.int64)
        out: list[dict | None] = [None] * len(ids)
        owner = np.searchsorted(np.asarray(self.offsets), ids, side="right") - 1
        for f in np.unique(owner):
            at = np.flatnonzero(owner == f)
            local = ids[at] - self.offsets[f]
            selection = self.selections[f]
            rows = selection.start + local if isinstance(selection, slice) else selection[local]
            for k, record in zip(at.tolist(), self.files[f].records(rows)):
                out[k] = record
        return out

    def close(self) -> None:
        for part in self.files:
            part.close()
        self.files, self.selections, self.offsets = [], [], [0]
