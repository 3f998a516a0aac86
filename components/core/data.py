"""The dataset artifact that ingest writes and every later step reads.

Images are float32 arrays shaped ``[N, C, H, W]`` with pixels in ``[0, 1]``;
labels are int64 class indices into ``class_names``. The artifact directory
holds ``splits.npz`` (train/val/test with labels, pool without), ``data_card.json``
and the monitoring reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core.localfiles import atomic_write_file

SPLITS_FILE = "splits.npz"
CARD_FILE = "data_card.json"
CARD_MARKDOWN = "data_card.md"
REFERENCE_FILE = "reference.csv"


@dataclass
class Splits:
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    pool_x: np.ndarray  # unlabeled: only for self-supervised pretraining
    class_names: list[str]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def unlabeled(self) -> np.ndarray:
        """Every image pretraining may see: the pool plus the train images (labels unused)."""
        return np.concatenate([self.pool_x, self.train_x])


def save_splits(splits: Splits, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, numpy would append ".npz" to the temp name
            np.savez_compressed(
                f,
                train_x=splits.train_x, train_y=splits.train_y,
                val_x=splits.val_x, val_y=splits.val_y,
                test_x=splits.test_x, test_y=splits.test_y,
                pool_x=splits.pool_x,
                class_names=np.array(splits.class_names, dtype=str),
            )

    return atomic_write_file(out / SPLITS_FILE, write)


def load_splits(dataset_dir: str | Path) -> Splits:
    path = Path(dataset_dir) / SPLITS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{dataset_dir} is not a dataset artifact: {SPLITS_FILE} is missing (run ingest first)")
    with np.load(path, allow_pickle=False) as z:
        return Splits(
            train_x=z["train_x"], train_y=z["train_y"],
            val_x=z["val_x"], val_y=z["val_y"],
            test_x=z["test_x"], test_y=z["test_y"],
            pool_x=z["pool_x"],
            class_names=[str(c) for c in z["class_names"]],
        )


def load_card(dataset_dir: str | Path) -> dict:
    return json.loads((Path(dataset_dir) / CARD_FILE).read_text())


# ---------------------------------------------------------------------------
# Loading: every accepted source form is dispatched in ``load_source``.
# ---------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MIN_IMAGES_PER_CLASS = 5  # one each for train/val/test/pool plus one spare
ACCEPTED_SOURCES = (
    "'digits' (scikit-learn's built-in 8x8 digits), "
    "a directory with one sub-folder of PNG/JPEG images per class, "
    "an .npz file with arrays 'images' and 'labels' (optional 'class_names'), "
    "or the s3:// URI of such a folder (a prefix) or .npz object"
)


class DataValidationError(ValueError):
    """The data cannot be used as it is; the message says what is wrong and how to fix it."""


def load_source(source: str, image_size: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load images, labels and class names from ``source``.

    Returns images float32 ``[N, C, H, W]`` in ``[0, 1]``, labels int64 indices into
    the class names. ``image_size > 0`` resizes every image to that square size.
    """
    if image_size < 0:
        raise ValueError(f"image_size must be 0 (keep the native size) or a positive number of pixels, got {image_size}")
    source = str(source).strip()
    if source == "digits":
        images, labels, class_names = _load_digits()
    elif source.startswith("s3://"):
        return _load_s3(source, image_size)  # downloads, then loads through this same dispatch
    elif Path(source).is_dir():
        return _load_image_folder(Path(source), image_size)  # resized while decoding
    elif source.endswith(".npz") and Path(source).is_file():
        images, labels, class_names = _load_npz(Path(source))
    else:
        missing = " (no such file or directory)" if not Path(source).exists() else ""
        raise ValueError(f"unknown data source {source!r}{missing}; accepted forms: {ACCEPTED_SOURCES}")
    if image_size > 0 and images.shape[2:] != (image_size, image_size):
        images = resize_images(images, image_size)
    return images, labels, class_names


def _load_s3(source: str, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Download an ``s3://`` .npz object or image-folder prefix to a temp dir and load it from there.

    Endpoint and credentials come from the environment (see ``components.core.s3_client``).
    Messages about the files name the s3:// URI, not the temp dir.
    """
    import tempfile

    from components.core import blobs

    with tempfile.TemporaryDirectory(prefix="ingest-s3-") as tmp:
        if source.endswith(".npz"):
            local = Path(tmp) / source.rsplit("/", 1)[-1]
            blobs.get_file(source, local)
        else:
            local = Path(tmp) / "data"
            blobs.get_dir(source, local)
        print(f"ingest: downloaded {source} to {local}", flush=True)
        try:
            return load_source(str(local), image_size)
        except ValueError as e:
            raise type(e)(str(e).replace(str(local), source.rstrip("/"))) from e


def _load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # pixel values are 0..16
    return images, digits.target.astype(np.int64), [str(d) for d in range(10)]


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _load_image_folder(root: Path, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image, UnidentifiedImageError

    entries = [p for p in root.iterdir() if not _is_hidden(p)]
    if not entries:
        raise DataValidationError(f"{root} is empty (0 images): add one sub-folder of images per class")
    class_dirs = sorted((p for p in entries if p.is_dir()), key=lambda p: p.name)
    if not class_dirs:
        raise DataValidationError(
            f"{root} has no class sub-folders: put the images of each class in their own folder, "
            f"e.g. {root}/cat/001.png and {root}/dog/001.png"
        )
    files: list[tuple[Path, int]] = []
    skipped = 0
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.iterdir()):
            if _is_hidden(path) or not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((path, label))
            else:
                skipped += 1
    if skipped:
        print(f"ingest: skipped {skipped} files that are not {'/'.join(IMAGE_EXTENSIONS)}", flush=True)
    if not files:
        raise DataValidationError(
            f"{root} has class folders ({', '.join(p.name for p in class_dirs)}) but no "
            f"{'/'.join(IMAGE_EXTENSIONS)} images in them (0 images)"
        )

    # First pass reads only the headers: the colour mode and size decide how to decode.
    modes, sizes = [], set()
    for path, _ in files:
        try:
            with Image.open(path) as im:
                modes.append(im.mode)
                sizes.add(im.size)
        except (UnidentifiedImageError, OSError) as e:
            raise DataValidationError(f"cannot read image {path}: {e}; remove or replace the file") from e
    grayscale = all(m in ("L", "1") for m in modes)
    if image_size == 0 and len(sizes) > 1:
        examples = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
        raise DataValidationError(
            f"images in {root} have {len(sizes)} different sizes ({examples}, ...); "
            "set --data-image-size N to resize them all to N x N pixels"
        )

    arrays = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                im = im.convert("L" if grayscale else "RGB")  # RGBA/palette → RGB, alpha dropped
                if image_size > 0 and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as e:
            raise DataValidationError(f"cannot read image {path}: {e}; remove or replace the file") from e
    stacked = np.stack(arrays)
    images = stacked[:, None] if grayscale else stacked.transpose(0, 3, 1, 2)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return images.astype(np.float32) / 255.0, labels, [p.name for p in class_dirs]


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import zipfile

    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataValidationError(f"{path} holds a single array, not an .npz archive with 'images' and 'labels'")
        with loaded as z:
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise DataValidationError(
                    f"{path} lacks the array(s) {missing}; it has {z.files}. "
                    "Save it with np.savez(path, images=..., labels=..., class_names=...)"
                )
            images, labels = z["images"], z["labels"]
            names = z["class_names"] if "class_names" in z.files else None
    except DataValidationError:
        raise
    except (OSError, zipfile.BadZipFile) as e:
        raise DataValidationError(f"cannot read {path} as an .npz archive: {e}") from e
    except ValueError as e:
        # allow_pickle=False refuses object arrays (e.g. lists of Python strings).
        raise DataValidationError(
            f"cannot read {path}: {e}. Store labels and class_names as plain int or str arrays, not Python objects"
        ) from e

    images = _to_nchw(images, path)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)  # the range is checked by validate()
    else:
        raise DataValidationError(
            f"{path}: images have dtype {images.dtype}; use uint8 (0..255) or float with pixels in [0, 1]"
        )
    labels, class_names = _encode_labels(labels, names, path)
    return images, labels, class_names


def _to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim == 3:  # [N, H, W] grayscale
        return images[:, None]
    if images.ndim == 4:
        if images.shape[1] in (1, 3):  # already [N, C, H, W]
            return images
        if images.shape[3] in (1, 3):  # [N, H, W, C]
            return images.transpose(0, 3, 1, 2)
    raise DataValidationError(
        f"{path}: images have shape {images.shape}; expected [N, H, W], [N, C, H, W] or [N, H, W, C] with C = 1 or 3"
    )


def _encode_labels(labels: np.ndarray, names: np.ndarray | None, path: Path) -> tuple[np.ndarray, list[str]]:
    if labels.ndim != 1:
        raise DataValidationError(f"{path}: labels must be a 1-D array, got shape {labels.shape}")
    class_names = [str(c) for c in names.astype(str).ravel()] if names is not None else None
    if labels.dtype.kind in "US":  # string labels → indices into the (given or sorted) class names
        labels = labels.astype(str)
        if class_names is None:
            class_names = sorted(set(labels.tolist()))
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted(set(labels.tolist()) - index.keys())
        if unknown:
            raise DataValidationError(f"{path}: labels {unknown[:5]} are not in class_names {class_names}")
        return np.array([index[s] for s in labels.tolist()], dtype=np.int64), class_names
    if labels.dtype.kind in "iu":
        if class_names is None:  # e.g. labels {3, 7} become classes "3", "7" with indices 0, 1
            values = np.unique(labels)
            return np.searchsorted(values, labels).astype(np.int64), [str(v) for v in values.tolist()]
        return labels.astype(np.int64), class_names  # the range is checked by validate()
    raise DataValidationError(f"{path}: labels have dtype {labels.dtype}; use integers or strings")


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """Resize float ``[N, C, H, W]`` images in [0, 1] to ``image_size`` x ``image_size`` (bilinear)."""
    from PIL import Image

    n, c = images.shape[:2]
    out = np.empty((n, c, image_size, image_size), dtype=np.float32)
    for i in range(n):
        for ch in range(c):
            plane = Image.fromarray(np.ascontiguousarray(images[i, ch], dtype=np.float32), mode="F")
            out[i, ch] = np.asarray(plane.resize((image_size, image_size), Image.Resampling.BILINEAR))
    return np.clip(out, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def validate(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Check that the data can be split and trained on; raise ``DataValidationError`` if not.

    Exact duplicate images with the same label are not an error (they would leak
    between train and test, so they get dropped): their positions are returned in
    ``duplicate_indices`` (drop them with ``drop_duplicates``). Returns a report
    that the data card records.
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        shape = getattr(images, "shape", None)
        raise DataValidationError(f"images must be an array shaped [N, C, H, W], got shape {shape}")
    n, c, h, w = images.shape
    if n == 0:
        raise DataValidationError("no images: the source is empty (0 images)")
    if c not in (1, 3) or h < 1 or w < 1:
        raise DataValidationError(f"images must be shaped [N, C, H, W] with C = 1 or 3, got shape {images.shape}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataValidationError(f"labels must be a 1-D array, got shape {labels.shape}")
    if len(labels) != n:
        raise DataValidationError(f"mismatched counts: {n} images but {len(labels)} labels; every image needs one label")
    if labels.dtype.kind not in "iu":
        raise DataValidationError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataValidationError(
            f"labels must lie in [0, {len(class_names) - 1}] (one per class name), found {labels.min()}..{labels.max()}"
        )
    if len(set(class_names)) != len(class_names):
        raise DataValidationError(f"class names must be unique, got {class_names}")
    finite = np.isfinite(images)
    if not finite.all():
        bad = int((~finite.reshape(n, -1)).any(axis=1).sum())
        raise DataValidationError(f"{bad} images contain NaN or inf pixels; fix or remove them")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise DataValidationError(
            f"pixels must lie in [0, 1], found {lo:g}..{hi:g}; scale float images to [0, 1] "
            "(uint8 images in 0..255 are scaled automatically)"
        )

    duplicate_indices, conflicting_groups = _find_duplicates(images, labels)
    if conflicting_groups:
        raise DataValidationError(
            f"{conflicting_groups} groups of identical images carry conflicting labels; "
            "fix the labels or remove the copies"
        )
    keep = np.ones(n, dtype=bool)
    keep[duplicate_indices] = False
    counts = np.bincount(labels[keep], minlength=len(class_names))
    present = int((counts > 0).sum())
    if present < 2:
        raise DataValidationError(
            f"need at least 2 classes to train a classifier, found {present} ({', '.join(class_names) or 'none'})"
        )
    too_small = {class_names[i]: int(k) for i, k in enumerate(counts) if k < MIN_IMAGES_PER_CLASS}
    if too_small:
        raise DataValidationError(
            f"classes with too few images to split into train/val/test/pool (need >= {MIN_IMAGES_PER_CLASS} each): {too_small}"
        )
    return {
        "n_images_loaded": int(n),
        "n_images_kept": int(keep.sum()),
        "duplicates_found": len(duplicate_indices),
        "duplicates_removed": len(duplicate_indices),
        "duplicate_indices": duplicate_indices,
        "class_counts": {name: int(k) for name, k in zip(class_names, counts)},
        "image_shape": [int(c), int(h), int(w)],
    }


def _find_duplicates(images: np.ndarray, labels: np.ndarray) -> tuple[list[int], int]:
    """Positions of exact repeats (all but the first copy) and the number of groups with conflicting labels."""
    import hashlib

    first_seen: dict[bytes, int] = {}
    repeats: list[int] = []
    conflicting: set[bytes] = set()
    contiguous = np.ascontiguousarray(images, dtype=np.float32)
    for i in range(len(contiguous)):
        key = hashlib.blake2b(contiguous[i].tobytes(), digest_size=16).digest()
        if key not in first_seen:
            first_seen[key] = i
            continue
        repeats.append(i)
        if labels[i] != labels[first_seen[key]]:
            conflicting.add(key)
    return repeats, len(conflicting)


def drop_duplicates(images: np.ndarray, labels: np.ndarray, report: dict) -> tuple[np.ndarray, np.ndarray]:
    """Remove the duplicate positions that ``validate`` reported (the first copy stays)."""
    keep = np.ones(len(images), dtype=bool)
    keep[report["duplicate_indices"]] = False
    return images[keep], labels[keep]


# ---------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------


def check_fractions(test_fraction: float, val_fraction: float, pool_fraction: float) -> None:
    fractions = {"test_fraction": test_fraction, "val_fraction": val_fraction, "pool_fraction": pool_fraction}
    for name, value in fractions.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if test_fraction <= 0.0:
        raise ValueError("test_fraction must be > 0: the evaluation gate needs a held-out test split")
    if val_fraction <= 0.0:
        raise ValueError("val_fraction must be > 0: fine-tuning needs a validation split for early stopping")
    total = sum(fractions.values())
    if total >= 1.0:
        raise ValueError(
            f"test_fraction + val_fraction + pool_fraction must be < 1 to leave images for training, got {total:g}"
        )


def split_indices(
    labels: np.ndarray, seed: int, test_fraction: float, val_fraction: float, pool_fraction: float
) -> dict[str, np.ndarray]:
    """Stratified, shuffled positions of each split: every class is cut in the same proportions.

    Shuffling matters: sources are often ordered (digits by writer, folders by
    file name), and cutting the first N would give test a different population.
    """
    check_fractions(test_fraction, val_fraction, pool_fraction)
    rng = np.random.default_rng(seed)
    fractions = {"test": test_fraction, "val": val_fraction, "pool": pool_fraction}
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": [], "pool": []}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n = len(members)
        # At least one image of every class in each non-empty split, so each split sees every class.
        sizes = {k: max(1, round(f * n)) if f > 0 else 0 for k, f in fractions.items()}
        if n - sum(sizes.values()) < 1:
            raise DataValidationError(
                f"class {cls} has only {n} images: too few to give train, val, test and pool each a share "
                f"with these fractions; lower the fractions or add images"
            )
        start = 0
        for name in ("test", "val", "pool"):
            parts[name].append(members[start : start + sizes[name]])
            start += sizes[name]
        parts["train"].append(members[start:])
    # Shuffle within each split too, so classes are interleaved rather than in blocks.
    return {name: rng.permutation(np.concatenate(chunks)).astype(np.int64) for name, chunks in parts.items()}


def split(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    seed: int,
    test_fraction: float,
    val_fraction: float,
    pool_fraction: float,
) -> Splits:
    """Stratified, seeded train/val/test/pool split; the pool keeps images only (labels dropped)."""
    idx = split_indices(labels, seed, test_fraction, val_fraction, pool_fraction)
    return Splits(
        train_x=images[idx["train"]], train_y=labels[idx["train"]].astype(np.int64),
        val_x=images[idx["val"]], val_y=labels[idx["val"]].astype(np.int64),
        test_x=images[idx["test"]], test_y=labels[idx["test"]].astype(np.int64),
        pool_x=images[idx["pool"]],
        class_names=list(class_names),
    )


# ---------------------------------------------------------------------------
# Data card
# ---------------------------------------------------------------------------


def _pixel_stats(images: np.ndarray) -> list[dict]:
    if len(images) == 0:
        return []
    return [
        {
            "channel": ch,
            "mean": round(float(images[:, ch].mean()), 4),
            "std": round(float(images[:, ch].std()), 4),
            "min": round(float(images[:, ch].min()), 4),
            "max": round(float(images[:, ch].max()), 4),
        }
        for ch in range(images.shape[1])
    ]


def data_card(splits: Splits, source: str, seed: int, validation_report: dict) -> dict:
    """A JSON-friendly description of the dataset artifact: what went in, how it was cut, what it looks like."""
    from datetime import datetime, timezone

    labeled = {"train": splits.train_y, "val": splits.val_y, "test": splits.test_y}
    images = {"train": splits.train_x, "val": splits.val_x, "test": splits.test_x, "pool": splits.pool_x}
    k = len(splits.class_names)
    return {
        "source": str(source),
        "seed": int(seed),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "image_shape": [int(s) for s in splits.image_shape],
        "class_names": list(splits.class_names),
        "n_classes": k,
        "counts": {name: int(len(x)) for name, x in images.items()},
        # The pool has no labels by design, so it has no class balance.
        "class_balance": {
            name: {c: int(n) for c, n in zip(splits.class_names, np.bincount(y, minlength=k))}
            for name, y in labeled.items()
        },
        "pixel_stats": {name: _pixel_stats(x) for name, x in images.items()},
        "n_images_loaded": int(validation_report.get("n_images_loaded", 0)),
        "duplicates_removed": int(validation_report.get("duplicates_removed", 0)),
    }


def data_card_markdown(card: dict) -> str:
    """The data card as readable Markdown tables."""
    splits = list(card["counts"])
    labeled = list(card["class_balance"])
    total = sum(card["counts"].values()) or 1
    lines = [
        "# Data card",
        "",
        "| | |",
        "|---|---|",
        f"| Source | `{card['source']}` |",
        f"| Split seed | {card['seed']} |",
        f"| Created | {card['created_at']} |",
        f"| Image shape (C, H, W) | {' x '.join(str(s) for s in card['image_shape'])} |",
        f"| Classes | {card['n_classes']} |",
        f"| Images loaded | {card['n_images_loaded']} |",
        f"| Exact duplicates removed | {card['duplicates_removed']} |",
        "",
        "## Splits",
        "",
        "| Split | Images | Share |",
        "|---|---:|---:|",
        *(f"| {s} | {card['counts'][s]} | {card['counts'][s] / total:.1%} |" for s in splits),
        "",
        "The pool is unlabeled: only self-supervised pretraining uses it.",
        "",
        "## Class balance",
        "",
        "| Class | " + " | ".join(labeled) + " |",
        "|---|" + "---:|" * len(labeled),
        *(
            f"| {c} | " + " | ".join(str(card["class_balance"][s][c]) for s in labeled) + " |"
            for c in card["class_names"]
        ),
        "",
        "## Pixel statistics",
        "",
        "| Split | Channel | Mean | Std | Min | Max |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {s} | {p['channel']} | {p['mean']:.4f} | {p['std']:.4f} | {p['min']:.4f} | {p['max']:.4f} |"
            for s in splits
            for p in card["pixel_stats"][s]
        ),
        "",
    ]
    return "\n".join(lines)
