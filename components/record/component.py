"""The KFP entry of the record step: the gates' outputs and every step's metrics in, the run's ``trained`` and
``gated`` records appended to the release ledger.

pipelines/kfp_steps.py writes the KFP function around it (one typed input per config field). It runs after the
three gates and outside their conditions, so a blocked run is recorded too; deploy takes its output (the gated
record) as the parent of the ``released`` record.
"""

from __future__ import annotations

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.core.settings import Settings


def record_component(
    model: Input[Model],
    dataset: Input[Dataset],
    ingest_metrics: Input[Metrics],
    pretrain_metrics: Input[Metrics],
    finetune_metrics: Input[Metrics],
    evaluate_metrics: Input[Metrics],
    privacy_metrics: Input[Metrics],
    robustness_metrics: Input[Metrics],
    passed_evaluate: bool,
    passed_privacy: bool,
    passed_robustness: bool,
    cfg: Settings,
    metrics: Output[Metrics],
    run_id: str = "",
    kfp_run_id: str = "",
    image: str = "",
) -> str:
    """Record the run in the release ledger: what was trained (run, config and its hash, data card hash, code, cost) and how its gates decided.

    The ledger is ``serving.ledger_uri``, else ``$KFP_MLOPS_LEDGER`` (the storage ConfigMap on a cluster), else
    ``<serving.home>/ledger``. A retry finds the records it already wrote instead of writing them twice.

    Args:
        model: The classifier artifact from finetune (its metadata gives the model version).
        dataset: The dataset artifact from ingest (its data_card.json is hashed).
        ingest_metrics: The ingest step's metrics (split sizes, cost).
        pretrain_metrics: The pretrain step's metrics (final loss, cost).
        finetune_metrics: The finetune step's metrics (validation accuracy, cost).
        evaluate_metrics: The evaluate gate's metrics (numbers, verdict, reason).
        privacy_metrics: The privacy gate's metrics (numbers, verdict, reason).
        robustness_metrics: The robustness gate's metrics (numbers, verdict, reason).
        passed_evaluate: The evaluate gate's output.
        passed_privacy: The privacy gate's output.
        passed_robustness: The robustness gate's output.
        cfg: Every area of the run's config: recorded with its sha256.
        metrics: Output: whether the gates released the model, and the step's cost.
        run_id: The pipeline run (its job name); a local run's own id comes from $KFP_MLOPS_RUN_ID.
        kfp_run_id: The KFP run id (what a retrain on drift started).
        image: The image the steps run in (cluster.image on a cluster; empty on one machine).

    Returns:
        The id of the gated record (deploy's parent for the released record).
    """
    from components.core.cost import log_metrics, measure, typed_metrics
    from components.core.ledger import Ledger, location
    from components.record.record import record_run

    with measure(gpu=False) as cost:
        ledger = Ledger(location(cfg.serving))
        step_metrics = {"ingest": ingest_metrics, "pretrain": pretrain_metrics, "finetune": finetune_metrics,
                        "evaluate": evaluate_metrics, "privacy": privacy_metrics, "robustness": robustness_metrics}
        trained, gated = record_run(
            ledger, run_id=run_id, kfp_run_id=kfp_run_id, model_dir=model.path, dataset_dir=dataset.path,
            model_uri=model.uri, dataset_uri=dataset.uri, config=cfg.as_dict(), image=image,
            step_metrics={step: typed_metrics(dict(m.metadata)) for step, m in step_metrics.items()},
            passed={"evaluate": passed_evaluate, "privacy": passed_privacy, "robustness": passed_robustness})
    log_metrics(metrics, {"released_by_gates": gated.data["passed"], **cost.as_metrics()})
    print(f"[record] ledger {ledger.base}: trained {trained.id} (run {trained.data['run_id']}, model "
          f"v{trained.data['model_version'][:12]}), gated {gated.id} "
          f"({'passed' if gated.data['passed'] else 'blocked by ' + ', '.join(gated.data['blocked_by'])})", flush=True)
    return gated.id
