"""The run settings a step receives, typed again after the trip through the pipeline.

The pipeline hands each step one ``config`` input: the areas of the run config the
step uses (``pipelines/config.py`` declares them), as ``{"values": {area: {field:
value}}, "types": {area: {field: "int" | "float" | "bool" | "str"}}}``. Values come
from the run's root parameters and arrive as text on some backends (kfp.local
substitutes them into the dict as strings), and a root parameter whose default is
falsy is declared as text in the compiled pipeline: the stock KFP run form treats
``0``, ``false`` and ``""`` defaults as missing. So every value is decoded here with
its declared type, strictly: ``1.5`` is never a whole number, ``"maybe"`` never a bool.

Empty text travels as ``""`` (two double quotes), which the run form accepts.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

EMPTY_TEXT = '""'
TYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class Settings(SimpleNamespace):
    """One area of the run config (``cfg.epochs``), or the areas of a step (``cfg.finetune.epochs``)."""

    def as_dict(self) -> dict[str, Any]:
        return {k: v.as_dict() if isinstance(v, Settings) else v for k, v in vars(self).items()}


def encode(value: Any) -> Any:
    """A value as a root parameter declared as text carries it (the inverse of :func:`decode_value`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if value == "":
        return EMPTY_TEXT
    return value


def decode_value(value: Any, type_name: str, where: str) -> Any:
    """``value`` as the type named ``type_name``; ValueError naming ``where`` when it is not one."""
    typ = TYPE_NAMES.get(type_name)
    if typ is None:
        raise ValueError(f"{where}: unknown setting type {type_name!r}")
    if typ is str:
        text = value if isinstance(value, str) else str(value)
        return "" if text == EMPTY_TEXT else text
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"{where} must be a {'whole ' if typ is int else ''}number, got {value!r}") from None
    if not isinstance(number, (int, float)) or not math.isfinite(number):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    if typ is int:
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(f"{where} must be a whole number, got {value!r}")
        return int(number)
    return float(number)


def decode(config: dict[str, Any]) -> Settings:
    """The ``config`` input of a step as typed settings: ``decode(config).finetune.epochs``."""
    try:
        values, types = config["values"], config["types"]
    except (KeyError, TypeError):
        raise ValueError("a step's config input must be {'values': ..., 'types': ...} as the pipeline builds it") from None
    areas = {}
    for area, fields in types.items():
        given = values.get(area, {})
        missing = sorted(set(fields) - set(given))
        if missing:
            raise ValueError(f"the run config's '{area}' area lacks {', '.join(missing)}")
        areas[area] = Settings(**{name: decode_value(given[name], type_name, f"run parameter {area}_{name}")
                                  for name, type_name in fields.items()})
    return Settings(**areas)
