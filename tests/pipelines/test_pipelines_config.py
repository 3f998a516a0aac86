import argparse
import dataclasses

import pytest

from pipelines import config


def test_every_field_has_a_description_and_default():
    for p in config.parameters(tuple(config._area_types())):
        assert p.help.strip(), p.key
        assert p.default is not dataclasses.MISSING, p.key
        assert isinstance(p.default, p.type), f"{p.key}: default {p.default!r} is not {p.type.__name__}"


def test_yaml_then_flags(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"")
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  epochs: 3\nfinetune:\n  learning_rate: 1\ngates:\n  min_test_accuracy: 0.5\n")
    cfg = config.load(path)
    assert cfg.pretrain.epochs == 3
    assert cfg.finetune.learning_rate == 1.0 and isinstance(cfg.finetune.learning_rate, float)
    parser = argparse.ArgumentParser()
    config.add_flags(parser)
    args = parser.parse_args(["--pretrain-epochs", "7", "--data-source", str(tmp_path / "x.npz")])
    cfg2 = config.apply_flags(cfg, args)
    assert (cfg2.pretrain.epochs, cfg2.data.source, cfg2.gates.min_test_accuracy) == (7, str(tmp_path / "x.npz"), 0.5)
    assert cfg.pretrain.epochs == 3, "apply_flags must not modify its input"


def test_flat_parameters_use_area_prefix():
    flat = config.flat_parameters(config.Config())
    assert flat["data_source"] == "digits"
    assert "cluster_image" not in flat, "cluster settings are compile-time, not run parameters"


@pytest.mark.parametrize(
    "yaml_text, messages",
    [
        ("bogus:\n  x: 1\n", ["unknown config section 'bogus'"]),
        ("pretrain:\n  epoch: 3\n", ["unknown key 'epoch' in config section 'pretrain'"]),
        ("pretrain: 3\n", ["config section 'pretrain' must be a mapping"]),
        ("- a\n- b\n", ["the top level must be a mapping"]),
        ("pretrain:\n  epochs: many\n", ["pretrain.epochs must be a whole number, got 'many'"]),
        ("pretrain:\n  epochs: 1.5\n", ["pretrain.epochs must be a whole number, got 1.5"]),
        ("pretrain:\n  epochs: '3'\n", ["pretrain.epochs must be a whole number, got '3'"]),
        ("pretrain:\n  compile: maybe\n", ["pretrain.compile must be true or false, got 'maybe'"]),
        ("finetune:\n  learning_rate: fast\n", ["finetune.learning_rate must be a number, got 'fast'"]),
        ("data:\n  source: [a, b]\n", ["data.source must be text, got list ['a', 'b']"]),
        ("serving:\n  model_name: 7\n", ["serving.model_name must be text, got int 7 (quote it: '7')"]),
        ("pretrain:\n  epochs: -2\n", ["pretrain.epochs must be >= 1, got -2"]),
        ("finetune:\n  label_fraction: 1.5\n", ["finetune.label_fraction must be > 0 and <= 1, got 1.5"]),
        ("finetune:\n  mode: half\n", ["finetune.mode must be one of 'full', 'partial', 'linear_probe', got 'half'"]),
        ("finetune:\n  learning_rate: .nan\n", ["finetune.learning_rate must be a finite number"]),
        ("data:\n  source: /no/such/folder\n", ["data.source '/no/such/folder' does not exist"]),
        ("data:\n  test_fraction: 0.5\n  val_fraction: 0.5\n", ["must be < 1 to leave images for training"]),
        ("pretrain:\n  arch: resnet\n  depth: 4\n", ["pretrain.depth 4 is not a depth of arch 'resnet'"]),
        ("gates:\n  override: true\n", ["gates.override needs gates.override_reason"]),
        ("serving:\n  inference_port: 70000\n", ["serving.inference_port must be >= 1 and <= 65535, got 70000"]),
        # every problem at once, one line each
        ("pretrain:\n  epochs: -1\n  batch_size: 1.5\nfinetune:\n  label_fraction: 2\n  bogus: 1\n",
         ["pretrain.epochs must be >= 1", "pretrain.batch_size must be a whole number, got 1.5",
          "finetune.label_fraction must be > 0 and <= 1, got 2", "unknown key 'bogus' in config section 'finetune'"]),
        # YAML that does not parse: where, not a traceback
        ("pretrain:\n  epochs: [1, 2\n", ["not valid YAML at line 3, column 1"]),
        ("pretrain:\n\tepochs: 3\n", ["not valid YAML at line 2"]),
    ],
)
def test_bad_config_is_rejected_with_one_clear_message_per_problem(tmp_path, yaml_text, messages):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    text = str(err.value)
    assert text.startswith(f"{path} has {len(messages)} problem"), text
    for message in messages:
        assert message in text
    assert len(err.value.problems) == len(messages)


def test_flags_are_validated_like_the_yaml():
    parser = argparse.ArgumentParser()
    config.add_flags(parser)
    args = parser.parse_args(["--pretrain-epochs", "0", "--data-test-fraction", "1.2"])
    with pytest.raises(config.ConfigError) as err:
        config.apply_flags(config.Config(), args)
    assert err.value.problems == ["data.test_fraction must be > 0 and < 1, got 1.2", "pretrain.epochs must be >= 1, got 0"]


def test_fixed_choices_are_flag_choices(capsys):
    parser = argparse.ArgumentParser()
    config.add_flags(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--finetune-mode", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err


def test_a_cluster_source_is_not_looked_up_on_this_machine():
    cfg = config.from_dict({"data": {"source": "/data/in/the/image"}}, target=config.CLUSTER)
    assert cfg.data.source == "/data/in/the/image"


def test_cluster_defaults_differ_only_where_a_field_says_so():
    local, cluster = config.defaults(config.LOCAL), config.defaults(config.CLUSTER)
    assert (cluster.serving.deploy_target, cluster.gates.champion_model) == ("kubernetes", "store")
    assert (local.serving.deploy_target, local.gates.champion_model) == ("local", "serving")
    assert dataclasses.replace(cluster.serving, deploy_target="local") == local.serving
    local_only = {p.key for p in config.parameters()} - {p.key for p in config.parameters(target=config.CLUSTER)}
    assert {"serving_host", "serving_inference_port", "serving_management_port", "serving_metrics_port",
            "serving_home"} <= local_only


def test_the_defaults_have_no_problem():
    for target in config.TARGETS:
        assert config.problems(config.defaults(target), target) == []


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.load("/nonexistent/config.yaml")


def test_example_configs_load():
    from pathlib import Path

    examples = sorted(Path(__file__).resolve().parents[2].glob("examples/*.yaml"))
    assert examples, "examples/ should hold at least one config"
    for path in examples:
        config.load(path)


def test_exponent_floats_are_numbers_as_in_yaml_1_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  dp_delta: 1e-6\n  learning_rate: 2E-3\n")
    cfg = config.load(path)
    assert (cfg.finetune.dp_delta, cfg.finetune.learning_rate) == (1e-6, 2e-3)
