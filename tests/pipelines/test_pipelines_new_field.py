"""One knob, one place: a field added to a config dataclass alone becomes a flag of ``mlops run``, a YAML key, a
setting of the compiled pipeline's ``other_settings`` (a root parameter locally), an input of its step's task, and a
value the step receives."""

import argparse
import dataclasses

import pytest
import yaml

from pipelines import config

HELP = "A setting added by a test, to show it reaches every place with no other edit."


@pytest.fixture
def new_field(monkeypatch):
    """``data.test_knob`` (int, default 7) added to DataConfig at run time, as if written into pipelines/config.py."""
    extended = dataclasses.make_dataclass("DataConfig", [("test_knob", int, config.knob(7, HELP, ge=1))],
                                          bases=(config.DataConfig,))
    monkeypatch.setattr(config, "DataConfig", extended)  # Config's annotation 'DataConfig' resolves to it
    return extended


def test_a_new_field_is_a_flag_a_yaml_key_and_is_validated(new_field, tmp_path):
    parser = argparse.ArgumentParser()
    config.add_flags(parser)
    cfg = config.apply_flags(config.defaults(), parser.parse_args(["--data-test-knob", "3"]))
    assert cfg.data.test_knob == 3
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  test_knob: 11\n")
    assert config.load(path).data.test_knob == 11
    path.write_text("data:\n  test_knob: 0\n")
    with pytest.raises(config.ConfigError, match="data.test_knob must be >= 1, got 0"):
        config.load(path)


def test_a_new_field_is_in_the_run_forms_other_settings_and_an_input_of_its_steps(new_field, tmp_path):
    from pipelines.pipeline import SETTINGS_TASK, STEP_AREAS, compile_pipeline

    path = tmp_path / "pipeline.yaml"
    compile_pipeline(str(path))
    spec = next(yaml.safe_load_all(path.read_text()))
    other = spec["root"]["inputDefinitions"]["parameters"]["other_settings"]
    assert other["defaultValue"]["data"]["test_knob"] == 7
    settings = spec["components"][f"comp-{SETTINGS_TASK}"]["outputDefinitions"]["parameters"]
    assert settings["data_test_knob"]["parameterType"] == "NUMBER_INTEGER"
    for step in (s for s, areas in STEP_AREAS.items() if "data" in areas):
        component = spec["components"][f"comp-{step}"]["inputDefinitions"]["parameters"]["data_test_knob"]
        assert component["parameterType"] == "NUMBER_INTEGER" and component["description"] == HELP, step
        task = spec["root"]["dag"]["tasks"][step]["inputs"]["parameters"]["data_test_knob"]
        assert task == {"taskOutputParameter": {"outputParameterKey": "data_test_knob",
                                                "producerTask": SETTINGS_TASK}}, step


def test_a_new_field_is_set_and_checked_through_other_settings(new_field):
    from pipelines.run_settings import other_settings_of, resolve

    compiled = other_settings_of(config.defaults(config.CLUSTER))
    assert resolve({}, {}, {"data": {"test_knob": 5}}, compiled)["data_test_knob"] == 5
    assert resolve({}, {}, {}, compiled)["data_test_knob"] == 7
    with pytest.raises(config.ConfigError, match="data.test_knob must be >= 1, got 0"):
        resolve({}, {}, {"data": {"test_knob": 0}}, compiled)


def test_a_new_field_is_a_documented_root_parameter_of_the_local_pipeline(new_field):
    from pipelines.pipeline import root_parameters

    (root,) = [r for r in root_parameters(config.LOCAL) if r.key == "data_test_knob"]
    assert root.default == 7 and root.type is int and root.description().startswith(HELP)


def test_a_new_field_reaches_the_step_function_under_kfp_local(new_field, tmp_path, capfd, monkeypatch):
    from kfp import dsl, local
    from kfp.local import config as local_config

    from pipelines.pipeline import config_arguments, step_component

    monkeypatch.setattr(local_config.LocalExecutionConfig, "instance", None)  # kfp.local's state: restored after
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    ingest = step_component("ingest")
    cfg = config.defaults()
    cfg.data.test_knob = 5

    @dsl.pipeline
    def just_ingest():
        ingest(**config_arguments("ingest", cfg))

    just_ingest()
    out = capfd.readouterr().out
    settings = next(line for line in out.splitlines() if "[settings] " in line)
    assert '"test_knob": 5' in settings, settings
