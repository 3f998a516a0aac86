"""The settings a step receives (components/core/settings.py): typed again after the trip through the pipeline."""

import pytest

from components.core import settings


@pytest.mark.parametrize(
    "value, type_name, expected",
    [
        ("60.0", "int", 60), ("60", "int", 60), (60, "int", 60), (60.0, "int", 60), ("-3", "int", -3),
        ("0.5", "float", 0.5), (1, "float", 1.0), ("1e-05", "float", 1e-5),
        ("true", "bool", True), ("False", "bool", False), (True, "bool", True), ("0", "bool", False),
        ("digits", "str", "digits"), ('""', "str", ""), ("", "str", ""), (7, "str", "7"),
    ],
)
def test_decode_value(value, type_name, expected):
    decoded = settings.decode_value(value, type_name, "x")
    assert decoded == expected and type(decoded) is type(expected)


@pytest.mark.parametrize(
    "value, type_name, message",
    [
        ("1.5", "int", "must be a whole number, got '1.5'"), (1.5, "int", "must be a whole number"),
        ("many", "int", "must be a whole number, got 'many'"), (True, "int", "must be a number"),
        ("nan", "float", "finite"), ("inf", "float", "finite"), ("fast", "float", "must be a number"),
        ("maybe", "bool", "must be true or false"), ([1], "int", "must be a"),
    ],
)
def test_decode_value_refuses(value, type_name, message):
    with pytest.raises(ValueError) as err:
        settings.decode_value(value, type_name, "run parameter finetune_epochs")
    assert message in str(err.value) and "finetune_epochs" in str(err.value)


@pytest.mark.parametrize("value", [0, 0.0, False, "", 3, 2.5, True, "text", 1e-5])
def test_encode_then_decode_round_trips(value):
    type_name = type(value).__name__
    encoded = settings.encode(value)
    assert settings.decode_value(encoded, type_name, "x") == value
    if not value and not isinstance(value, str):
        assert encoded, "an encoded falsy value is truthy text (the KFP run form needs that)"
    assert encoded != "" 


def test_decode_builds_areas_and_names_what_is_missing():
    config = {"values": {"data": {"seed": "3"}, "finetune": {"epochs": "4.0", "mode": "full"}},
              "types": {"data": {"seed": "int"}, "finetune": {"epochs": "int", "mode": "str"}}}
    cfg = settings.decode(config)
    assert (cfg.data.seed, cfg.finetune.epochs, cfg.finetune.mode) == (3, 4, "full")
    assert cfg.as_dict() == {"data": {"seed": 3}, "finetune": {"epochs": 4, "mode": "full"}}
    del config["values"]["finetune"]["mode"]
    with pytest.raises(ValueError, match="'finetune' area lacks mode"):
        settings.decode(config)
    with pytest.raises(ValueError, match="as the pipeline builds it"):
        settings.decode({"epochs": 3})
