"""The KFP entry of the ingest step: its artifacts and settings in, the logic of this package called.

pipelines/kfp_steps.py writes the KFP function around it (one typed input per config field).
"""

from __future__ import annotations

from kfp.dsl import Dataset, Markdown, Metrics, Output

from components.core.settings import Settings


def ingest_component(
    cfg: Settings,
    dataset: Output[Dataset],
    data_card: Output[Markdown],
    metrics: Output[Metrics],
):
    """Load, validate and split the data into train/val/test and an unlabeled pretraining pool.

    Args:
        cfg: The run's ``data`` settings (source, seed, fractions, image size) as the pipeline passes them.
        dataset: Output directory: splits.npz, data_card.json, data_card.md and reference.csv.
        data_card: Output Markdown data card (counts, class balance, pixel statistics).
        metrics: Output split sizes, duplicates removed and the step's cost.
    """
    import os

    from components.core.cost import log_metrics, measure
    from components.core.data import data_card_markdown
    from components.ingest.ingest import ingest

    with measure(gpu=False) as cost:
        card = ingest(cfg.data.source, dataset.path, cfg)
    os.makedirs(os.path.dirname(data_card.path) or ".", exist_ok=True)
    with open(data_card.path, "w") as f:
        f.write(data_card_markdown(card))
    dataset.metadata.update(
        {"n_classes": card["n_classes"], "image_shape": card["image_shape"], "class_names": card["class_names"]}
    )
    counts = card["counts"]
    log_metrics(
        metrics,
        {
            "n_train": counts["train"],
            "n_val": counts["val"],
            "n_test": counts["test"],
            "n_pool": counts["pool"],
            "n_classes": card["n_classes"],
            "duplicates_removed": card["duplicates_removed"],
            **cost.as_metrics(),
        },
    )
