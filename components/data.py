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
    path = out / SPLITS_FILE
    tmp = out / (".tmp-" + SPLITS_FILE)
    with open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            train_x=splits.train_x, train_y=splits.train_y,
            val_x=splits.val_x, val_y=splits.val_y,
            test_x=splits.test_x, test_y=splits.test_y,
            pool_x=splits.pool_x,
            class_names=np.array(splits.class_names, dtype=str),
        )
    tmp.replace(path)
    return path


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
