"""One knob, one place: a field added to a config dataclass alone becomes a flag of ``mlops run``, a YAML key, a
documented root parameter of the compiled pipeline, an input of its step's task, and a value the step receives."""

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


def test_a_new_field_is_a_documented_root_parameter_and_an_input_of_its_steps(new_field, tmp_path):
    from pipelines.pipeline import STEP_AREAS, compile_pipeline

    path = tmp_path / "pipeline.yaml"
    compile_pipeline(str(path))
    spec = next(yaml.safe_load_all(path.read_text()))
    root = spec["root"]["inputDefinitions"]["parameters"]["data_test_knob"]
    assert root["defaultValue"] == 7 and root["parameterType"] == "NUMBER_INTEGER"
    assert root["description"].startswith(HELP) and "Allowed: >= 1." in root["description"]
    for step in (s for s, areas in STEP_AREAS.items() if "data" in areas):
        component = spec["components"][f"comp-{step}"]["inputDefinitions"]["parameters"]["data_test_knob"]
        assert component["parameterType"] == "NUMBER_INTEGER" and component["description"] == HELP, step
        task = spec["root"]["dag"]["tasks"][step]["inputs"]["parameters"]["data_test_knob"]
        assert task == {"componentInputParameter": "data_test_knob"}, step


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
