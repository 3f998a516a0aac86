"""What both deploy targets read from the step's inputs, and the smoke test a served model must pass.

A release is only reported when it was seen working: the first test-split images go as PNG
through the real endpoint (with the pipeline's own token, so the request log tags them as the
smoke test's), and every one must answer well-formed, with the expected model version, at an
accuracy of at least ``min_accuracy``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from components.core.data import Splits


def model_version_of(model_dir: str | Path) -> str:
    """The version a model artifact is released under (its metadata's ``model_version``)."""
    from components.core.models import METADATA_FILE

    metadata_file = Path(model_dir) / METADATA_FILE
    if not metadata_file.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model artifact: {METADATA_FILE} is missing (run finetune first)")
    return str(json.loads(metadata_file.read_text()).get("model_version") or "1.0")


def archive_settings(serving) -> dict[str, int]:
    """The .mar's model config from the serving settings (``cfg.serving``): TorchServe reads it from the
    archive when it loads the model, on both targets, and it wins over the server's own config."""
    return {"workers": serving.workers, "batch_size": serving.batch_size,
            "max_batch_delay_ms": serving.max_batch_delay_ms}


@dataclass(frozen=True)
class SmokeTest:
    """The first ``images`` test-split images of a dataset, and the accuracy a served model must reach on them."""

    splits: Splits
    images: int = 16
    min_accuracy: float = 0.5

    @classmethod
    def of_dataset(cls, dataset_dir: str | Path, images: int = 16, min_accuracy: float = 0.5) -> SmokeTest:
        from components.core.data import load_splits

        splits = load_splits(dataset_dir)
        if len(splits.test_y) == 0:
            raise ValueError(f"dataset {dataset_dir} has an empty test split: nothing to smoke-test the endpoint with")
        return cls(splits, images, min_accuracy)

    @property
    def count(self) -> int:
        return min(self.images, len(self.splits.test_y))

    def run(self, endpoint: str, model_version: str | None, *, token_file: str | Path | None = None,
            token: str | None = None, send: Callable[..., Any] | None = None) -> dict[str, Any]:
        """``serving.client.smoke_test``'s result, plus ``failed`` and a one-line ``summary``.

        ``model_version`` None accepts any version (a rollback's smoke test)."""
        from serving.client import smoke_test

        n, splits = self.count, self.splits
        result = smoke_test(endpoint, token_file, splits.test_x[:n], splits.test_y[:n], splits.class_names,
                            model_version=model_version, token=token, send=send)
        result["failed"] = bool(result["problems"]) or result["answered"] < n or result["accuracy"] < self.min_accuracy
        result["summary"] = (f"{result['answered']}/{n} answered, accuracy {result['accuracy']:.2f} "
                             f"(need {self.min_accuracy:.2f})")
        return result
