"""Tests of the privacy gate (privacy_check and the KFP step) on real, tiny digits models."""

import copy

import numpy as np
import pytest
from conftest import MEMORISED_EXAMPLES, run_gate_in_local_pipeline, settings_of
from kfp import dsl
from report_checks import assert_offline_report, figure_traces

from components.core.data import save_splits
from components.core.models import save_classifier
from components.core.settings import Settings
from components.privacy.component import privacy_component
from components.privacy.privacy import privacy_check, training_members
from components.privacy.report import render_privacy_report
from pipelines.config import DataConfig, GateConfig

DEFAULT_MAX_AUC = GateConfig().max_mia_auc

pytestmark = pytest.mark.usefixtures("one_thread")


def gate_settings(**gates) -> Settings:
    """The privacy gate's settings: the config's defaults with seed 0, and no reference attack unless asked for."""
    return settings_of(data=DataConfig(seed=0), gates=GateConfig(**{"mia_reference_models": 0, **gates}))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, splits, regularised_model, memorising_model):
    """A dataset dir plus two model dirs. The memoriser's dataset lists only its 50 images as train."""
    root = tmp_path_factory.mktemp("privacy")
    names = splits.class_names
    save_splits(splits, root / "dataset")
    save_classifier(regularised_model, root / "normal", {"class_names": names})
    small = copy.copy(splits)
    small.train_x, small.train_y = splits.train_x[:MEMORISED_EXAMPLES], splits.train_y[:MEMORISED_EXAMPLES]
    save_splits(small, root / "small_dataset")
    save_classifier(memorising_model, root / "memoriser", {"class_names": names})
    return root


def test_memorising_model_leaks_and_fails_while_normal_model_passes_default_gate(artifacts):
    normal = privacy_check(str(artifacts / "dataset"), str(artifacts / "normal"), gate_settings())
    memorised = privacy_check(str(artifacts / "small_dataset"), str(artifacts / "memoriser"), gate_settings())

    assert normal["nonmember_accuracy"] > 0.93  # a genuinely good model, not a trivially private one
    assert normal["passed"], normal["reason"]
    assert normal["mia_auc"] < DEFAULT_MAX_AUC - 0.04  # clear margin, not luck
    assert not memorised["passed"], memorised["reason"]
    assert memorised["mia_auc"] > DEFAULT_MAX_AUC + 0.1
    assert memorised["mia_auc"] > normal["mia_auc"] + 0.2
    assert memorised["member_accuracy"] == 1.0 and memorised["member_mean_loss"] < 0.05
    assert memorised["n_per_side"] == MEMORISED_EXAMPLES
    assert f"membership-inference AUC {memorised['mia_auc']:.3f} > max {DEFAULT_MAX_AUC:.3f}" in memorised["reason"]
    assert "<= max" in normal["reason"]


@pytest.mark.parametrize(
    "max_mia_auc, dataset, model, error, message",
    [
        (0.4, "dataset", "normal", ValueError, "max_mia_auc must be in [0.5, 1]"),
        (1.2, "dataset", "normal", ValueError, "max_mia_auc must be in [0.5, 1]"),
        (float("nan"), "dataset", "normal", ValueError, "max_mia_auc must be a number in [0.5, 1]"),
        ("0.6", "dataset", "normal", ValueError, "max_mia_auc must be a number in [0.5, 1]"),
        (0.65, "missing", "normal", FileNotFoundError, "is not a dataset artifact"),
        (0.65, "dataset", "missing", FileNotFoundError, "is not a model artifact"),
    ],
)
def test_bad_inputs_fail_with_a_clear_message(artifacts, max_mia_auc, dataset, model, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        privacy_check(str(artifacts / dataset), str(artifacts / model), gate_settings(max_mia_auc=max_mia_auc))


@pytest.mark.parametrize(
    "gates, message",
    [
        ({"max_dp_epsilon": 0.0}, "max_dp_epsilon must be a number > 0"),
        ({"max_leaks": -1}, "max_leaks must be a whole number >= 0"),
        ({"max_leaks": 1.5}, "max_leaks must be a whole number >= 0"),
        ({"near_duplicate_distance": 2.0}, r"near_duplicate_distance must be an RMS pixel distance in \[0, 1\]"),
        ({"mia_reference_models": -1}, "reference_models must be a whole number in 0..64"),
        ({"override": True}, "override=True needs an override_reason"),
    ],
)
def test_leak_dp_and_reference_limits_are_validated(artifacts, gates, message):
    with pytest.raises(ValueError, match=message):
        privacy_check(str(artifacts / "dataset"), str(artifacts / "normal"), gate_settings(**gates))


def test_reference_attack_exposes_the_memoriser_and_not_the_normal_model(artifacts):
    memorised = privacy_check(str(artifacts / "small_dataset"), str(artifacts / "memoriser"),
                              gate_settings(mia_reference_models=2))
    normal = privacy_check(str(artifacts / "dataset"), str(artifacts / "normal"), gate_settings(mia_reference_models=2))
    assert memorised["reference_models"] == 2 and memorised["reference_attack_auc"] > DEFAULT_MAX_AUC + 0.1
    assert memorised["mia_auc"] == max(memorised["loss_attack_auc"], memorised["confidence_attack_auc"],
                                       memorised["reference_attack_auc"])
    assert normal["reference_attack_auc"] < DEFAULT_MAX_AUC - 0.03 and normal["passed"], normal["reason"]
    assert 0.0 <= memorised["reference_attack_tpr_at_1pct_fpr"] <= 1.0


def test_members_are_the_images_the_model_trained_on(splits):
    from components.train.loops import subsample_labels

    assert np.array_equal(training_members(splits, {}), np.arange(len(splits.train_y)))
    few = training_members(splits, {"label_fraction": 0.1, "seed": 3})
    assert np.array_equal(few, subsample_labels(splits.train_y, 0.1, 3)) and 70 < len(few) < 90
    assert np.array_equal(training_members(splits, {"train_indices": [5, 1, 2]}), [5, 1, 2])


def test_leaks_block_the_gate_and_are_listed_in_the_report(artifacts, splits, tmp_path):
    leaky = copy.copy(splits)
    leaky.test_x = splits.test_x.copy()
    leaky.test_x[:3] = splits.train_x[:3]
    save_splits(leaky, tmp_path / "leaky")
    blocked = privacy_check(str(tmp_path / "leaky"), str(artifacts / "normal"), gate_settings(max_leaks=0))
    allowed = privacy_check(str(tmp_path / "leaky"), str(artifacts / "normal"), gate_settings(max_leaks=3))
    assert not blocked["passed"] and blocked["blocked_by"] == ["max_leaks"] and blocked["n_exact_duplicates"] == 3
    assert "train/test duplicates 3 > max 0 (3 exact, 0 near)" in blocked["reason"]
    assert allowed["passed"], allowed["reason"]
    text = render_privacy_report(blocked)
    assert "| 0 | 0 | exact | 0.0000 | 0 |" in text and "| 2 | 2 | exact |" in text


def test_component_runs_with_kfp_artifacts_and_writes_report(artifacts, tmp_path):
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    report = dsl.HTML(uri=str(tmp_path / "out" / "report.html"))
    assert report.path == str(tmp_path / "out" / "report.html")  # a local uri is the path itself

    passed = privacy_component(
        dataset=dsl.Dataset(uri=str(artifacts / "small_dataset")), model=dsl.Model(uri=str(artifacts / "memoriser")),
        cfg=settings_of(data=DataConfig(seed=0), gates=GateConfig(max_mia_auc=DEFAULT_MAX_AUC)),
        metrics=metrics, report=report,
    )
    assert passed is False
    assert metrics.metadata["passed"] == 0.0
    assert metrics.metadata["mia_auc"] > DEFAULT_MAX_AUC
    assert metrics.metadata["max_mia_auc"] == DEFAULT_MAX_AUC
    assert metrics.metadata["cost_wall_seconds"] > 0
    page = (tmp_path / "out" / "report.html").read_text()
    assert_offline_report(page, ["membership-roc"])
    assert "<h1>Privacy check — FAILED</h1>" in page and "membership-inference AUC" in page
    assert "<td>loss threshold</td>" in page  # the Markdown tables rendered, not shown raw
    assert "| loss threshold |" not in page and "\n## " not in page
    assert page.index("<h2>Membership inference</h2>") < page.index('id="membership-roc"') \
        < page.index("<h2>Leakage: train/test duplicates</h2>")
    roc = figure_traces(page, "membership-roc")
    curves = {t["name"]: t for t in roc if t["mode"] == "lines"}
    loss = curves[f"loss threshold (AUC {metrics.metadata['loss_attack_auc']:.3f})"]
    assert loss["x"][0] == 0 and loss["x"][-1] == 1 and loss["y"][-1] == 1 and len(loss["x"]) == len(loss["y"])
    [point] = [t for t in roc if t["name"].startswith("loss threshold: TPR")]
    assert point["y"] == [pytest.approx(metrics.metadata["loss_attack_tpr_at_1pct_fpr"], abs=1e-6)]
    assert "chance (AUC 0.5)" in {t["name"] for t in roc}


def test_component_compiles_as_a_kfp_component():
    from pipelines.pipeline import step_component

    inputs = step_component("privacy").component_spec.inputs
    assert {"dataset", "model", "gates_max_mia_auc", "data_seed"} <= set(inputs)


def test_override_releases_a_blocked_model_and_says_so(artifacts, tmp_path):
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    report = dsl.HTML(uri=str(tmp_path / "report.html"))
    passed = privacy_component(
        dataset=dsl.Dataset(uri=str(artifacts / "small_dataset")), model=dsl.Model(uri=str(artifacts / "memoriser")),
        cfg=gate_settings(max_mia_auc=DEFAULT_MAX_AUC, override=True,
                          override_reason="DPO sign-off #42: synthetic data only"),
        metrics=metrics, report=report,
    )
    assert passed is True
    m = metrics.metadata
    assert m["passed"] == 1.0 and m["passed_checks"] == 0.0 and m["overridden"] == 1.0
    assert m["blocked_by_max_mia_auc"] == 1.0 and m["blocked_by_max_leaks"] == 0.0
    page = (tmp_path / "report.html").read_text()
    assert "<h1>Privacy check — FAILED (OVERRIDDEN)</h1>" in page and "DPO sign-off #42: synthetic data only" in page
    assert "<blockquote>" in page  # the override banner, rendered


@pytest.mark.slow
def test_component_runs_in_a_local_kfp_pipeline(artifacts, tmp_path):
    """KFP copies only the function's source: this proves the body is self-contained and the output is the bool."""
    from pipelines.config import Config

    cfg = Config(data=DataConfig(seed=0), gates=GateConfig(max_mia_auc=DEFAULT_MAX_AUC))
    output = run_gate_in_local_pipeline("privacy", cfg, artifacts / "small_dataset", artifacts / "memoriser",
                                        tmp_path / "root")
    assert output is False


@pytest.mark.slow
def test_overfit_example_config_is_blocked_by_the_privacy_gate(tmp_path):
    """examples/overfit.yaml through the real step functions (what `mlops run` runs, minus kfp.local)."""
    from pathlib import Path

    from components.finetune.finetune import finetune
    from components.ingest.ingest import ingest
    from components.pretrain.pretrain import pretrain
    from pipelines import config
    from pipelines.config import FinetuneConfig, PretrainConfig

    cfg = config.load(Path(__file__).parent.parent.parent / "examples" / "overfit.yaml")
    p, f, g = cfg.pretrain, cfg.finetune, cfg.gates
    assert f.patience >= f.epochs and f.label_fraction <= 0.1  # no early stopping, few labels
    quiet = lambda line: None  # noqa: E731
    ingest(cfg.data.source, tmp_path / "dataset", settings_of(data=DataConfig(seed=cfg.data.seed)))
    pretrained = PretrainConfig(objective=p.objective, epochs=p.epochs, batch_size=p.batch_size,
                                learning_rate=p.learning_rate, width=p.width, embed_dim=p.embed_dim)
    pretrain(tmp_path / "dataset", tmp_path / "encoder", settings_of(data=DataConfig(seed=0), pretrain=pretrained),
             log=quiet)
    finetuned = FinetuneConfig(epochs=f.epochs, batch_size=f.batch_size, learning_rate=f.learning_rate,
                               patience=f.patience, label_fraction=f.label_fraction,
                               encoder_lr_scale=f.encoder_lr_scale, min_epoch_samples=f.min_epoch_samples)
    finetune(tmp_path / "dataset", tmp_path / "encoder", tmp_path / "model",
             settings_of(data=DataConfig(seed=0), finetune=finetuned), log=quiet)
    result = privacy_check(str(tmp_path / "dataset"), str(tmp_path / "model"),
                           gate_settings(max_mia_auc=g.max_mia_auc, mia_reference_models=g.mia_reference_models,
                                         max_leaks=g.max_leaks))
    assert not result["passed"] and result["blocked_by"] == ["max_mia_auc"], result["reason"]
    assert result["mia_auc"] > g.max_mia_auc + 0.1  # far over the limit, not a near miss
    assert result["member_accuracy"] == 1.0
