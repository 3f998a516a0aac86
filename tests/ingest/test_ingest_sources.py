"""Ingest from every source form (digits, image folders, .npz), the message each bad input gets, and the step's
written artifact and component."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import settings_of
from kfp.dsl import Dataset, Markdown, Metrics
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from components.core.data import (
    CARD_FILE,
    CARD_MARKDOWN,
    REFERENCE_FILE,
    SPLITS_FILE,
    DataValidationError,
    load_card,
    load_source,
    load_splits,
)
from components.core.features import FEATURE_COLUMNS
from components.ingest.component import ingest_component
from components.ingest.ingest import ingest
from pipelines.config import DataConfig


def _digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target  # [N, 8, 8]


def _photo_tiles(size: int = 24, per_photo: int = 8) -> dict[str, list[np.ndarray]]:
    """Real photos (scikit-learn's china.jpg and flower.jpg) cut into tiles: one class per photo."""
    photos = load_sample_images()
    tiles = {}
    for name, photo in zip(("china", "flower"), photos.images):
        h, w = photo.shape[:2]
        ys = np.linspace(0, h - size, per_photo).astype(int)
        xs = np.linspace(0, w - size, per_photo).astype(int)
        tiles[name] = [photo[y : y + size, x : x + size] for y, x in zip(ys, xs[::-1])]
    return tiles


def _write_folder(root: Path, tiles: dict[str, list[np.ndarray]], gray: bool = False) -> Path:
    for cls, images in tiles.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, tile in enumerate(images):
            im = Image.fromarray(tile)
            if gray:
                im = im.convert("L")
            # Mix lossless PNG and JPEG: both must load.
            im.save(root / cls / (f"{i:03d}.png" if i % 2 else f"{i:03d}.jpg"), quality=95)
    (root / ".DS_Store").write_bytes(b"hidden junk")
    (root / tiles_first_class(tiles) / ".hidden.png").write_bytes(b"not an image")
    return root


def tiles_first_class(tiles: dict) -> str:
    return next(iter(tiles))


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


def test_image_folder_rgb_and_gray(tmp_path):
    tiles = _photo_tiles()
    rgb_root = _write_folder(tmp_path / "rgb", tiles)
    images, labels, class_names = load_source(str(rgb_root))
    assert class_names == ["china", "flower"]
    assert images.shape == (16, 3, 24, 24) and images.dtype == np.float32
    assert np.bincount(labels).tolist() == [8, 8]
    # The PNG tiles are lossless: pixel-exact with the photo.
    np.testing.assert_array_equal(images[1].transpose(1, 2, 0), tiles["china"][1] / np.float32(255))

    gray_root = _write_folder(tmp_path / "gray", tiles, gray=True)
    gray, _, _ = load_source(str(gray_root))
    assert gray.shape == (16, 1, 24, 24)


def test_image_folder_resize_and_mixed_sizes(tmp_path):
    tiles = _photo_tiles(size=24)
    tiles["flower"] = [t[:20, :20] for t in tiles["flower"]]  # a second size
    root = _write_folder(tmp_path / "mixed", tiles)
    with pytest.raises(DataValidationError, match="--data-image-size"):
        load_source(str(root))
    images, labels, _ = load_source(str(root), image_size=12)
    assert images.shape == (16, 3, 12, 12)
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_npz_sources(tmp_path):
    images_u8, target = _digits_uint8()
    # uint8, [N, H, W, C] RGB, string labels without class names → sorted names.
    rgb = np.repeat(images_u8[..., None], 3, axis=3)
    words = np.array(["even", "odd"])[target % 2]
    np.savez(tmp_path / "rgb.npz", images=rgb, labels=words)
    x, y, names = load_source(str(tmp_path / "rgb.npz"))
    assert x.shape == (1797, 3, 8, 8) and x.dtype == np.float32 and x.max() == 1.0
    assert names == ["even", "odd"] and np.array_equal(y, target % 2)

    # float [N, C, H, W] with int labels and explicit class names.
    floats = (images_u8[:, None] / 255.0).astype(np.float64)
    names_in = [f"digit-{d}" for d in range(10)]
    np.savez(tmp_path / "float.npz", images=floats, labels=target, class_names=np.array(names_in))
    x, y, names = load_source(str(tmp_path / "float.npz"))
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    assert names == names_in and np.array_equal(y, target)

    # int labels without names are re-indexed: {3, 7} → 0, 1 named "3", "7".
    keep = np.isin(target, [3, 7])
    np.savez(tmp_path / "pair.npz", images=images_u8[keep], labels=target[keep])
    _, y, names = load_source(str(tmp_path / "pair.npz"), image_size=16)
    assert names == ["3", "7"] and set(y.tolist()) == {0, 1}


# ---------------------------------------------------------------------------
# Bad inputs: one table, each with the message the user sees.
# ---------------------------------------------------------------------------


def _npz(tmp: Path, **arrays) -> str:
    path = tmp / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def _ten_by_two(value: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(10, 1, 4, 4)).astype(np.float32)
    images[0, 0, 0, 0] = value
    return images, np.array([0, 1] * 5)


def _empty_folder(tmp: Path) -> str:
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


def _no_class_folders(tmp: Path) -> str:
    root = tmp / "flat"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "a.png")
    return str(root)


def _class_folders_without_images(tmp: Path) -> str:
    for cls in ("a", "b"):
        (tmp / "noimg" / cls).mkdir(parents=True)
        (tmp / "noimg" / cls / "notes.txt").write_text("no images here")
    return str(tmp / "noimg")


def _unreadable_image(tmp: Path) -> str:
    root = _write_folder(tmp / "broken", _photo_tiles(size=8, per_photo=5))
    (root / "flower" / "corrupt.png").write_bytes(b"\x89PNG not really")
    return str(root)


def _mixed_sizes(tmp: Path) -> str:
    tiles = _photo_tiles(size=16, per_photo=5)
    tiles["flower"][0] = tiles["flower"][0][:10, :12]
    return str(_write_folder(tmp / "mixed", tiles))


def _conflicting_duplicates(tmp: Path) -> str:
    images, labels = _ten_by_two()
    images = np.concatenate([images, images[:3]])
    return _npz(tmp, images=images, labels=np.concatenate([labels, 1 - labels[:3]]))


BAD_INPUTS = [
    ("empty folder", _empty_folder, {}, "is empty (0 images)"),
    ("no class sub-folders", _no_class_folders, {}, "has no class sub-folders"),
    ("class folders without images", _class_folders_without_images, {}, "(a, b) but no .png/.jpg/.jpeg images"),
    ("unreadable image", _unreadable_image, {}, "corrupt.png"),
    ("mixed sizes", _mixed_sizes, {}, "set --data-image-size"),
    ("5-D images", lambda t: _npz(t, images=np.zeros((10, 1, 1, 4, 4)), labels=np.zeros(10, int)), {}, "expected [N, H, W]"),
    ("4 channels", lambda t: _npz(t, images=np.zeros((10, 4, 4, 4), np.uint8), labels=np.zeros(10, int)), {}, "C = 1 or 3"),
    ("no images array", lambda t: _npz(t, pixels=np.zeros((10, 4, 4)), labels=np.zeros(10, int)), {}, "lacks the array(s) ['images']"),
    ("int16 pixels", lambda t: _npz(t, images=np.zeros((10, 4, 4), np.int16), labels=np.zeros(10, int)), {}, "use uint8"),
    ("object labels", lambda t: _npz(t, images=np.zeros((10, 4, 4)), labels=np.array([1, "a"] * 5, dtype=object)), {}, "not Python objects"),
    ("empty npz", lambda t: _npz(t, images=np.zeros((0, 4, 4), np.uint8), labels=np.zeros(0, int)), {}, "no images"),
    ("NaN pixel", lambda t: _npz(t, images=_ten_by_two(np.nan)[0], labels=_ten_by_two()[1]), {}, "1 images contain NaN or inf"),
    ("pixel above 1", lambda t: _npz(t, images=_ten_by_two(2.5)[0], labels=_ten_by_two()[1]), {}, "pixels must lie in [0, 1], found"),
    ("single class", lambda t: _npz(t, images=_ten_by_two()[0], labels=np.zeros(10, int)), {}, "at least 2 classes"),
    ("mismatched counts", lambda t: _npz(t, images=_ten_by_two()[0], labels=np.zeros(9, int)), {}, "10 images but 9 labels"),
    ("conflicting duplicates", _conflicting_duplicates, {}, "3 groups of identical images carry conflicting labels"),
    ("class too small", lambda t: _npz(t, images=_ten_by_two()[0], labels=np.array([0] * 7 + [1] * 3)), {}, "too few images"),
    ("label not in class names", lambda t: _npz(t, images=_ten_by_two()[0], labels=np.array(["a", "b"] * 5), class_names=np.array(["a", "c"])), {}, "not in class_names"),
    ("unknown source", lambda t: str(t / "nowhere" / "data.csv"), {}, "accepted forms"),
    ("s3 URI without a bucket", lambda t: "s3:///digits/", {}, "has no bucket name: write s3://BUCKET/KEY"),
    ("test fraction 1", lambda t: "digits", {"test_fraction": 1.0}, "test_fraction must be in [0, 1)"),
    ("negative pool fraction", lambda t: "digits", {"pool_fraction": -0.1}, "pool_fraction must be in [0, 1)"),
    ("no validation split", lambda t: "digits", {"val_fraction": 0.0}, "val_fraction must be > 0"),
    ("fractions sum to 1", lambda t: "digits", {"test_fraction": 0.4, "val_fraction": 0.3, "pool_fraction": 0.3}, "must be < 1"),
    ("negative image size", lambda t: "digits", {"image_size": -1}, "image_size must be 0"),
]


@pytest.mark.parametrize("make_source, kwargs, message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_fail_with_a_clear_message(tmp_path, make_source, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        ingest(make_source(tmp_path), out, settings_of(data=DataConfig(**kwargs)))
    assert message in str(err.value)
    assert not (out / SPLITS_FILE).exists()  # nothing half-written


# ---------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------


def test_ingest_writes_the_artifact(tmp_path):
    root = _write_folder(tmp_path / "photos", _photo_tiles(size=24, per_photo=10))
    out = tmp_path / "dataset"
    card = ingest(str(root), out, settings_of(data=DataConfig(seed=1, image_size=16)))
    for name in (SPLITS_FILE, CARD_FILE, CARD_MARKDOWN, REFERENCE_FILE):
        assert (out / name).is_file(), name
    splits = load_splits(out)
    assert splits.class_names == ["china", "flower"] and splits.image_shape == (3, 16, 16)
    assert load_card(out) == card
    reference = pd.read_csv(out / REFERENCE_FILE)
    assert list(reference.columns) == FEATURE_COLUMNS + ["label"]
    assert len(reference) == len(splits.train_x) + len(splits.val_x)
    assert reference["label"].tolist() == np.concatenate([splits.train_y, splits.val_y]).tolist()


def test_ingest_component_with_kfp_artifacts(tmp_path):
    dataset = Dataset(uri=str(tmp_path / "dataset"))
    card_md = Markdown(uri=str(tmp_path / "card" / "data_card.md"))
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    ingest_component(cfg=settings_of(data=DataConfig(source="digits", seed=0, test_fraction=0.2, val_fraction=0.15,
                                                      pool_fraction=0.2, image_size=0)),
                     dataset=dataset, data_card=card_md, metrics=metrics)
    splits = load_splits(dataset.path)
    logged = metrics.metadata
    assert logged["n_train"] == len(splits.train_x) and logged["n_test"] == len(splits.test_x)
    assert logged["n_val"] + logged["n_pool"] + logged["n_train"] + logged["n_test"] == 1797
    assert logged["n_classes"] == 10 and logged["duplicates_removed"] == 0
    assert logged["cost_wall_seconds"] > 0
    assert Path(card_md.path).read_text().startswith("# Data card")
    assert dataset.metadata["image_shape"] == [1, 8, 8]


def test_ingest_component_builds_as_a_kfp_component():
    # KFP needs real (not stringified) annotations and an Args docstring entry per parameter.

    from pipelines.pipeline import step_component

    spec = step_component("ingest").component_spec
    assert set(spec.inputs) == {"data_source", "data_seed", "data_test_fraction", "data_val_fraction",
                                "data_pool_fraction", "data_image_size"}
    assert set(spec.outputs) == {"dataset", "data_card", "metrics"}
    for name, spec_input in spec.inputs.items():
        assert spec_input.description, name
