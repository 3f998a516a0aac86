"""What the record step writes into the release ledger: the run's ``trained`` record (run, config and its hash,
the data card's hash, the code that ran, what each step cost) and its ``gated`` record (every gate's numbers,
verdict, override and reason), parent: trained.

Appending is made safe to retry: a ``trained`` record of the same run and model version, and a ``gated`` record
that follows from it, are found and returned instead of written twice. Only the standard library and the ledger
are imported, so the step starts quickly and needs little memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from components.core.ledger import IMAGE_ENV, IMAGE_ID_ENV, RUN_ID_ENV, Ledger, Record, config_sha256

PACKAGE = "kfp-mlops"
CARD_FILE = "data_card.json"  # in the dataset artifact (components.core.data.CARD_FILE; not imported: numpy)
METADATA_FILE = "metadata.json"  # in the model artifact (components.core.models.METADATA_FILE; not imported: torch)
GATES = {"evaluate": "evaluation", "privacy": "privacy", "robustness": "robustness"}  # gate step -> gate name
VERDICT_KEYS = ("passed", "passed_checks", "override", "overridden", "reason", "remedy", "override_reason")


def sha256_of(path: str | Path) -> str | None:
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def model_version_of(model_dir: str | Path) -> str:
    metadata = Path(model_dir) / METADATA_FILE
    if not metadata.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model artifact: {METADATA_FILE} is missing (run finetune first)")
    return str(json.loads(metadata.read_text()).get("model_version") or "1.0")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def code_of(image: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """What code ran: the package version, and the image where the steps ran in one (``mlops run --runner docker``
    says which, with its id, in the environment; on a cluster it is the compiled ``cluster.image``)."""
    code: dict[str, Any] = {"package_version": package_version()}
    if environ.get(IMAGE_ID_ENV):
        code.update(image=environ.get(IMAGE_ENV) or image or None, image_id=environ[IMAGE_ID_ENV])
    elif image:
        code["image"] = image
    return code


def gate_verdict(passed: bool, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One gate as the ``gated`` record keeps it, from the gate's output and its metrics' metadata."""
    return {
        "passed": bool(passed),
        "passed_checks": bool(metrics.get("passed_checks", passed)),
        "override": bool(metrics.get("override", False)),
        "overridden": bool(metrics.get("overridden", False)),
        "reason": str(metrics.get("reason", "")),
        "override_reason": str(metrics.get("override_reason", "")),
        "remedy": str(metrics.get("remedy", "")),
        "blocked_by": sorted(k.removeprefix("blocked_by_") for k, v in metrics.items()
                             if k.startswith("blocked_by_") and v),
        "numbers": {k: v for k, v in metrics.items() if k not in VERDICT_KEYS and isinstance(v, (int, float, str))
                    and not k.startswith(("cost_", "blocked_by_"))},
    }


def step_costs(step_metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each step's cost (its ``cost_*`` metrics) and the sums over the steps."""
    costs = {step: {k.removeprefix("cost_"): v for k, v in metrics.items() if k.startswith("cost_")}
             for step, metrics in step_metrics.items()}
    total = {key: round(sum(c.get(key, 0.0) for c in costs.values()), 3)
             for key in ("wall_seconds", "cpu_seconds", "gpu_seconds")}
    return {"steps": costs, "total": total}


def _numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.startswith("cost_") and isinstance(v, (int, float, str))}


def record_run(ledger: Ledger, *, run_id: str, kfp_run_id: str, model_dir: str | Path, dataset_dir: str | Path,
               model_uri: str, dataset_uri: str, config: dict[str, Any], image: str,
               step_metrics: Mapping[str, Mapping[str, Any]], passed: Mapping[str, bool],
               environ: Mapping[str, str] | None = None) -> tuple[Record, Record]:
    """Append the run's ``trained`` and ``gated`` records (or find them, on a retry); returns both.

    ``step_metrics``: each step's metrics metadata (ingest, pretrain, finetune and the three gates);
    ``passed``: each gate step's output. A ``retrain_started`` record naming this run becomes the parent of
    ``trained``, so a drift verdict leads forward to the run it started.
    """
    environ = os.environ if environ is None else environ
    run_id = environ.get(RUN_ID_ENV) or run_id or kfp_run_id
    version = model_version_of(model_dir)
    missing = [step for step in GATES if step not in passed or step not in step_metrics]
    if missing:
        raise ValueError(f"the gated record needs every gate's verdict and metrics; missing: {', '.join(missing)}")

    trained = ledger.latest("trained", run_id=run_id, model_version=version)
    if trained is None:
        runs = {r for r in (run_id, kfp_run_id) if r}
        causes = [r for r in ledger.find("retrain_started") if r.data.get("run") in runs]
        trained = ledger.append("trained", {
            "run_id": run_id,
            "kfp_run_id": kfp_run_id,
            "model_version": version,
            "model_name": config.get("serving", {}).get("model_name"),
            "config": config,
            "config_sha256": config_sha256(config),
            "data_source": config.get("data", {}).get("source"),
            "data_card_sha256": sha256_of(Path(dataset_dir) / CARD_FILE),
            "dataset": dataset_uri,
            "model": model_uri,
            "code": code_of(image, environ),
            "training": {step: _numbers(step_metrics.get(step, {})) for step in ("ingest", "pretrain", "finetune")},
            "cost": step_costs(step_metrics),
        }, parents=causes[-1:])
    gated = next((r for r in reversed(ledger.find("gated", model_version=version)) if trained.id in r.parents), None)
    if gated is None:
        gates = {name: gate_verdict(passed[step], step_metrics[step]) for step, name in GATES.items()}
        gated = ledger.append("gated", {
            "run_id": run_id,
            "model_version": version,
            "gates": gates,
            "passed": all(g["passed"] for g in gates.values()),
            "blocked_by": [name for name, g in gates.items() if not g["passed"]],
            "overridden": [name for name, g in gates.items() if g["overridden"]],
        }, parents=[trained])
    return trained, gated
