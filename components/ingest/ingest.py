"""Step 1, ingest: load the raw data, validate it, split it, describe it.

Writes the dataset artifact every later step reads (``splits.npz``), its data
card (JSON and Markdown) and the monitoring reference (``reference.csv``: the
per-image features of the images the model learns from, computed once here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from components.core.data import (
    CARD_FILE,
    CARD_MARKDOWN,
    REFERENCE_FILE,
    check_fractions,
    data_card_markdown,
    drop_duplicates,
    load_source,
    save_splits,
    split,
    validate,
)
from components.core.data import (
    data_card as build_data_card,
)
from components.core.settings import Settings


def _log(message: str) -> None:
    print(f"ingest: {message}", flush=True)


def ingest(source: str, out_dir: str | Path, cfg: Settings) -> dict:
    """Load, validate and split ``source`` into ``out_dir``; return the data card.

    ``cfg``: the step's settings; ``cfg.data`` gives the split's seed and
    fractions and the image size (the step passes ``cfg.data.source`` as
    ``source``). ``out_dir`` receives ``splits.npz``, ``data_card.json``,
    ``data_card.md`` and ``reference.csv`` (image features of train + val plus
    their ``label`` index).
    """
    from components.core.features import image_features
    from components.core.localfiles import atomic_write_file, atomic_write_json, atomic_write_text

    data = cfg.data
    seed, image_size = data.seed, data.image_size
    check_fractions(data.test_fraction, data.val_fraction, data.pool_fraction)  # fail before a slow load
    _log(f"loading {source}" + (f" (resizing to {image_size}x{image_size})" if image_size else ""))
    images, labels, class_names = load_source(source, image_size=image_size)
    _log(f"loaded {len(images)} images shaped {tuple(images.shape[1:])}, {len(class_names)} classes")

    report = validate(images, labels, class_names)
    if report["duplicates_removed"]:
        _log(f"removed {report['duplicates_removed']} exact duplicate images (they would leak between splits)")
        images, labels = drop_duplicates(images, labels, report)

    splits = split(images, labels, class_names, seed, data.test_fraction, data.val_fraction, data.pool_fraction)
    _log(f"split (seed {seed}): train {len(splits.train_x)}, val {len(splits.val_x)}, "
         f"test {len(splits.test_x)}, pool {len(splits.pool_x)}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_splits(splits, out)
    card = build_data_card(splits, source, seed, report)
    atomic_write_json(out / CARD_FILE, card)
    atomic_write_text(out / CARD_MARKDOWN, data_card_markdown(card))

    # The monitoring reference: what the model was trained and selected on.
    reference = image_features(np.concatenate([splits.train_x, splits.val_x]))
    reference["label"] = np.concatenate([splits.train_y, splits.val_y])
    atomic_write_file(out / REFERENCE_FILE, lambda tmp: reference.to_csv(tmp, index=False))
    _log(f"wrote {out}")
    return card
