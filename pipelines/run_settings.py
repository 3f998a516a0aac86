"""The run settings of a cluster run: the run form's few boxes plus ``other_settings``, checked as one config.

The stock KFP run form (``NewRunParametersV2``) lists root parameters alphabetically as bare ``name - type``
boxes, without their descriptions, and edits a ``dict`` parameter in a JSON editor. So the compiled pipeline
offers a box for each of the few fields marked ``form=True`` in ``pipelines/config.py`` and one ``dict``
parameter, ``other_settings``, holding every other run field by area, as in a config file
(``{"pretrain": {"batch_size": 256}}``); its default shows all of them with their compiled values.

A first task of the run (``settings``) calls :func:`resolve`: the compiled settings, then ``other_settings``,
then the boxes, checked by ``pipelines.config.from_dict`` (types, ranges, choices and the rules between fields,
every problem at once) before any training starts. It runs in the pipeline image, which installs this package, so
the one validator of the config is used rather than a copy of it.
"""

from __future__ import annotations

import copy
from typing import Any

from components.core.settings import decode_value
from pipelines.config import CLUSTER, PARAMETER_AREAS, Config, ConfigError, from_dict, parameters

OTHER_SETTINGS = "other_settings"
WHERE = f"the run's settings (the run form's boxes and {OTHER_SETTINGS})"


def form_fields() -> list:
    """The fields with a box of their own in the cluster run form."""
    return [p for p in parameters(target=CLUSTER) if p.form]


def other_settings_of(cfg: Config, against: Config | None = None) -> dict[str, dict[str, Any]]:
    """The run fields without a box, by area: all of them, or only those that differ from ``against``."""
    out: dict[str, dict[str, Any]] = {}
    for p in parameters(target=CLUSTER):
        if p.form or (against is not None and p.value_in(cfg) == p.value_in(against)):
            continue
        out.setdefault(p.area, {})[p.name] = p.value_in(cfg)
    return out


def resolve(boxes: dict[str, Any], box_types: dict[str, str], other_settings: Any,
            compiled: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every run field's value (keyed ``area_field``) for a cluster run; ``ConfigError`` listing every problem.

    ``boxes``: the run form's boxes as they arrive (``box_types`` names each one's field type);
    ``other_settings``: the run's ``other_settings``; ``compiled``: the other fields' compiled values.
    """
    by_key = {p.key: p for p in parameters(target=CLUSTER)}
    local_only = {p.key for p in parameters() if p.local_only}
    merged, found = copy.deepcopy(compiled), []
    if not isinstance(other_settings, dict):
        found.append(f"{OTHER_SETTINGS} must be a mapping of sections ({{\"pretrain\": {{\"epochs\": 5}}}}), "
                     f"got {type(other_settings).__name__}")
        other_settings = {}
    for area, values in other_settings.items():
        if area == "cluster":
            found.append(f"{OTHER_SETTINGS}: the 'cluster' section is set when the pipeline is compiled "
                         "(mlops compile --cluster-...), not per run")
        elif area not in PARAMETER_AREAS or not isinstance(values, dict):
            merged[area] = values  # from_dict names the unknown section or the section that is not a mapping
        else:
            for name, value in values.items():
                key = f"{area}_{name}"
                if key in by_key and by_key[key].form:
                    found.append(f"{OTHER_SETTINGS} sets {area}.{name}, which has its own box in the run form: "
                                 f"set it in {key}")
                elif key in local_only:
                    found.append(f"{OTHER_SETTINGS} sets {area}.{name}, which applies to local runs only")
                else:
                    merged.setdefault(area, {})[name] = value
    for key, value in boxes.items():
        p = by_key[key]
        try:
            merged.setdefault(p.area, {})[p.name] = decode_value(value, box_types[key], f"run parameter {key}")
        except ValueError as err:
            found.append(str(err))
    try:
        cfg = from_dict(merged, CLUSTER, WHERE)
    except ConfigError as err:
        found += err.problems
    if found:
        raise ConfigError(found, WHERE)
    return {key: p.value_in(cfg) for key, p in by_key.items()}
