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
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  epochs: 3\nfinetune:\n  learning_rate: 1\ngates:\n  min_test_accuracy: 0.5\n")
    cfg = config.load(path)
    assert cfg.pretrain.epochs == 3
    assert cfg.finetune.learning_rate == 1.0 and isinstance(cfg.finetune.learning_rate, float)
    parser = argparse.ArgumentParser()
    config.add_flags(parser)
    args = parser.parse_args(["--pretrain-epochs", "7", "--data-source", "/tmp/x.npz"])
    cfg2 = config.apply_flags(cfg, args)
    assert (cfg2.pretrain.epochs, cfg2.data.source, cfg2.gates.min_test_accuracy) == (7, "/tmp/x.npz", 0.5)
    assert cfg.pretrain.epochs == 3, "apply_flags must not modify its input"


def test_flat_parameters_use_area_prefix():
    flat = config.flat_parameters(config.Config())
    assert flat["data_source"] == "digits"
    assert "cluster_image" not in flat, "cluster settings are compile-time, not run parameters"


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("bogus:\n  x: 1\n", "unknown config section"),
        ("pretrain:\n  epoch: 3\n", "unknown key(s) ['epoch']"),
        ("pretrain: 3\n", "must be a mapping"),
        ("pretrain:\n  epochs: many\n", "pretrain.epochs must be int"),
        ("finetune:\n  learning_rate: fast\n", "finetune.learning_rate must be float"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError) as err:
        config.load(path)
    assert message in str(err.value)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.load("/nonexistent/config.yaml")


def test_example_configs_load():
    from pathlib import Path

    examples = sorted(Path(__file__).parent.parent.glob("examples/*.yaml"))
    assert examples, "examples/ should hold at least one config"
    for path in examples:
        config.load(path)
