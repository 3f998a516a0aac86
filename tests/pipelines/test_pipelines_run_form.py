"""The cluster run form: a few boxes plus ``other_settings``, checked as one config by the first task, ``settings``,
whose outputs feed every step (``pipelines/run_settings.py``, ``pipelines/pipeline.py``)."""

import json

import pytest

from pipelines import config
from pipelines.config import CLUSTER, ConfigError
from pipelines.pipeline import SETTINGS_TASK, make_components, root_parameters, run_parameters, step_arguments
from pipelines.run_settings import OTHER_SETTINGS, other_settings_of, resolve


@pytest.fixture(scope="module")
def form():
    """The boxes' defaults as the run form sends them, their field types, and the compiled other settings."""
    roots = [r for r in root_parameters(CLUSTER) if r.field is not None]
    return ({r.key: r.default for r in roots}, {r.key: r.field.type.__name__ for r in roots},
            other_settings_of(config.defaults(CLUSTER)))


def test_a_setting_in_other_settings_and_a_box_reach_the_outputs_typed(form):
    boxes, types, compiled = form
    values = resolve({**boxes, "finetune_dp_epsilon": "2.5", "pretrain_epochs": 3}, types,
                     {"pretrain": {"batch_size": 256.0}, "gates": {"champion_model": "none"}}, compiled)
    assert values["pretrain_batch_size"] == 256 and type(values["pretrain_batch_size"]) is int
    assert values["gates_champion_model"] == "none"
    assert values["finetune_dp_epsilon"] == 2.5 and values["pretrain_epochs"] == 3
    assert values["serving_deploy_target"] == "kubernetes", "left out: the compiled value"
    assert set(values) == {p.key for p in config.parameters(target=CLUSTER)}


def test_the_compiled_values_are_the_base_not_the_built_in_defaults(form):
    boxes, types, _ = form
    baked = config.defaults(CLUSTER)
    baked.pretrain.batch_size = 64
    assert resolve(boxes, types, {}, other_settings_of(baked))["pretrain_batch_size"] == 64


def test_bad_settings_fail_with_every_problem_named(form):
    boxes, types, compiled = form
    with pytest.raises(ConfigError) as err:
        resolve({**boxes, "finetune_epochs": 0, "finetune_dp_epsilon": "lots"}, types, {
            "pretrain": {"batch_sise": 2, "epochs": 3},
            "gates": {"max_leaks": -1, "pgd_steps": "ten"},
            "serving": {"host": "0.0.0.0"},
            "cluster": {"image": "x"},
            "shop": {},
        }, compiled)
    message = str(err.value)
    for expected in ("unknown key 'batch_sise' in config section 'pretrain'",
                     "other_settings sets pretrain.epochs, which has its own box in the run form: set it in "
                     "pretrain_epochs",
                     "gates.max_leaks must be >= 0, got -1",
                     "gates.pgd_steps must be a whole number, got 'ten'",
                     "other_settings sets serving.host, which applies to local runs only",
                     "the 'cluster' section is set when the pipeline is compiled",
                     "unknown config section 'shop'",
                     "finetune.epochs must be >= 1, got 0",
                     "run parameter finetune_dp_epsilon must be a number, got 'lots'"):
        assert expected in message, message
    assert len(err.value.problems) == 9, err.value.problems


def test_the_rules_between_fields_are_checked_too(form):
    boxes, types, compiled = form
    with pytest.raises(ConfigError, match="test_fraction \\+ val_fraction \\+ pool_fraction must be < 1"):
        resolve(boxes, types, {"data": {"test_fraction": 0.5, "val_fraction": 0.5}}, compiled)
    with pytest.raises(ConfigError, match="gates.override needs gates.override_reason"):
        resolve(boxes, types, {"gates": {"override": True}}, compiled)
    with pytest.raises(ConfigError, match="other_settings must be a mapping of sections"):
        resolve(boxes, types, "pretrain: {epochs: 3}", compiled)


def test_submit_sends_the_boxes_and_only_the_other_settings_that_differ():
    cfg = config.defaults(CLUSTER)
    sent = run_parameters(cfg)
    assert OTHER_SETTINGS not in sent, "nothing differs: the compiled other_settings apply"
    assert set(sent) == {p.key for p in config.parameters(target=CLUSTER) if p.form}
    cfg.pretrain.epochs, cfg.pretrain.batch_size, cfg.gates.override_reason = 5, 64, "J. Doe"
    sent = run_parameters(cfg)
    assert sent["pretrain_epochs"] == 5
    assert sent[OTHER_SETTINGS] == {"pretrain": {"batch_size": 64}, "gates": {"override_reason": "J. Doe"}}
    assert sent["finetune_dp_epsilon"] == "0.0", "a box declared as text gets text"
    compiled = config.defaults(CLUSTER)
    compiled.pretrain.batch_size = 64
    assert run_parameters(cfg, compiled=compiled)[OTHER_SETTINGS] == {"gates": {"override_reason": "J. Doe"}}


def _settings_then_ingest(tmp_path, other_settings):
    """The cluster's settings task and the ingest step it feeds, run by kfp.local as subprocesses."""
    from kfp import dsl, local
    from kfp.local import config as local_config

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    roots = root_parameters(CLUSTER)
    components = make_components("python:3.11", roots, CLUSTER)
    boxes = {r.key: r.default for r in roots if r.field is not None}
    compiled = other_settings_of(config.defaults(CLUSTER))

    @dsl.pipeline
    def settings_then_ingest(other: dict):
        checked = components[SETTINGS_TASK](**boxes, other_settings=other, compiled_settings=compiled)
        outputs = {p.key: checked.outputs[p.key] for p in config.parameters(target=CLUSTER)}
        components["ingest"](**step_arguments("ingest", outputs, roots, CLUSTER))

    try:
        settings_then_ingest(other=other_settings)
    finally:
        local_config.LocalExecutionConfig.instance = None


def test_under_kfp_local_a_setting_reaches_the_step_and_a_bad_one_stops_the_run_first(tmp_path, capfd, monkeypatch):
    from kfp.local import config as local_config

    monkeypatch.setattr(local_config.LocalExecutionConfig, "instance", None)
    _settings_then_ingest(tmp_path / "good", {"data": {"seed": 3, "val_fraction": 0.1}})
    out = capfd.readouterr().out
    ingest = json.loads(next(line for line in out.splitlines()  # the step's own line, not the settings task's
                             if "[settings] " in line and '"data": {' in line).split("[settings] ", 1)[1])
    assert ingest["data"]["seed"] == 3 and ingest["data"]["val_fraction"] == 0.1

    with pytest.raises(RuntimeError):
        _settings_then_ingest(tmp_path / "bad", {"data": {"seed": -1}})
    captured = capfd.readouterr()
    both = captured.out + captured.err
    assert "data.seed must be >= 0, got -1" in both
    assert '[settings] {"data": {' not in both, "ingest must not start after the settings task failed"


def test_a_whole_number_set_in_code_on_a_float_field_travels_as_a_float():
    """KFP refuses an int for a float parameter (InconsistentTypeException); a value set in code is coerced."""
    from pipelines.config import LOCAL
    from pipelines.config import defaults as config_defaults
    from pipelines.pipeline import run_parameters

    cfg = config_defaults(LOCAL)
    cfg.gates.min_noise_accuracy = 0
    sent = run_parameters(cfg, LOCAL)
    assert sent["gates_min_noise_accuracy"] == 0.0 and type(sent["gates_min_noise_accuracy"]) is float
    cfg.pretrain.epochs = 2.5
    with pytest.raises(ValueError, match="whole number"):
        run_parameters(cfg, LOCAL)
