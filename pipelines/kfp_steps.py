"""The KFP function of each step, generated from the step function and the config.

A step function (``components/<step>``) takes its artifacts, a few compile-time
values and ``cfg``, the config areas it uses. KFP needs one typed input per run
parameter and reads a lightweight component's signature from its source, which
is embedded in the compiled pipeline. So the KFP function is written here, from
the step function's signature and the config fields: one input per field of the
step's areas (named like the field's root parameter, ``finetune_epochs``),
documented with the field's help. Its body decodes the inputs into typed settings
(``components.core.settings``) and calls the step function, which the image has
installed. A field added to a config dataclass therefore reaches the step with
no other edit, and every value travels as a plain typed KFP parameter (nothing
is substituted into text).

On a cluster a first task, ``settings``, is written here too (``settings_function``): it takes the run form's
boxes and ``other_settings``, checks them as one config (``pipelines.run_settings.resolve``) and outputs every
field, typed, to the steps' inputs.
"""

from __future__ import annotations

import inspect
import linecache
from dataclasses import dataclass
from typing import Any, Callable

import docstring_parser

from pipelines.config import Parameter

CFG = "cfg"  # the step function's parameter that receives the settings


@dataclass(frozen=True)
class StepInput:
    """One config field as an input of a step's KFP function."""

    field: Parameter
    type: type  # the KFP type: the field's own, or str where its root parameter is text

    @property
    def name(self) -> str:
        return self.field.key


def _annotation(param: inspect.Parameter) -> str:
    annotation = param.annotation
    if isinstance(annotation, str):
        return annotation
    raise TypeError(f"step function parameter {param.name!r} needs a string annotation "
                    "(add 'from __future__ import annotations' to its module)")


def _dict_source(areas: dict[str, list[str]]) -> str:
    """``{area: {entry, ...}, ...}`` as source, one entry per line."""
    blocks = [f"        {area!r}: {{\n" + "".join(f"            {entry},\n" for entry in entries) + "        },\n"
              for area, entries in areas.items()]
    return "{\n" + "".join(blocks) + "    }"


def kfp_function_source(step: str, function: Callable[..., Any], inputs: list[StepInput]) -> str:
    """The source of ``step``'s KFP function: the step function's other parameters, then one input per field."""
    signature = inspect.signature(function)
    if CFG not in signature.parameters:
        raise TypeError(f"the step function {function.__qualname__} takes no {CFG!r} parameter")
    docs = docstring_parser.parse(function.__doc__ or "")
    described = {p.arg_name: " ".join(p.description.split()) for p in docs.params}
    required, optional, calls, arg_docs = [], [], [], []
    for name, param in signature.parameters.items():
        if name == CFG:
            continue
        text = f"{name}: {_annotation(param)}"
        if param.default is inspect.Parameter.empty:
            required.append(text)
        else:
            optional.append(f"{text} = {param.default!r}")
        calls.append(f"{name}={name}")
        arg_docs.append(f"        {name}: {described.get(name, name)}")
    for item in inputs:
        required.append(f"{item.name}: {item.type.__name__}")
        arg_docs.append(f"        {item.name}: {item.field.help}")
    values: dict[str, list[str]] = {}
    types: dict[str, list[str]] = {}
    for item in inputs:
        values.setdefault(item.field.area, []).append(f"{item.field.name!r}: {item.name}")
        types.setdefault(item.field.area, []).append(f"{item.field.name!r}: {item.field.type.__name__!r}")
    values_src, types_src = _dict_source(values), _dict_source(types)
    returns = signature.return_annotation
    returns = "" if returns is inspect.Signature.empty else f" -> {returns}"
    summary = (docs.short_description or step).replace('"""', "'''")
    params = ",\n    ".join(required + optional)
    return f'''def {step}(
    {params},
){returns}:
    """{summary}

    Args:
{chr(10).join(arg_docs)}
    """
    import json

    from components.core.settings import decode
    from {function.__module__} import {function.__name__}

    values = {values_src}
    types = {types_src}
    {CFG} = decode({{"values": values, "types": types}})
    print("[settings] " + json.dumps({CFG}.as_dict(), sort_keys=True), flush=True)
    return {function.__name__}({", ".join(calls + [f"{CFG}={CFG}"])})
'''


def kfp_function(step: str, function: Callable[..., Any], inputs: list[StepInput]) -> Callable[..., Any]:
    """The generated KFP function as a Python function (its source findable by inspect, as KFP needs)."""
    return _define(step, kfp_function_source(step, function, inputs))


def _define(step: str, source: str) -> Callable[..., Any]:
    filename = f"<kfp-mlops step {step}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {}
    exec("from kfp.dsl import *\nfrom typing import *\n", namespace)
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)  # real annotations: KFP reads them
    return namespace[step]


def settings_function_source(boxes: list[StepInput], outputs: list[Parameter], other_settings: str,
                             compiled_input: str) -> str:
    """The source of the cluster's ``settings`` task: the form's boxes, ``other_settings`` and the compiled
    values of the other fields in; every field out, typed, under its ``area_field`` name."""
    params = ",\n    ".join([f"{b.name}: {b.type.__name__}" for b in boxes]
                              + [f"{other_settings}: dict", f"{compiled_input}: dict"])
    returns = ", ".join(f"({p.key!r}, {p.type.__name__})" for p in outputs)
    box_values = "".join(f"        {b.name!r}: {b.name},\n" for b in boxes)
    box_types = "".join(f"        {b.name!r}: {b.field.type.__name__!r},\n" for b in boxes)
    names = "".join(f"        {p.key!r},\n" for p in outputs)
    arg_docs = "\n".join([f"        {b.name}: {b.field.help}" for b in boxes] + [
        f"        {other_settings}: Every other run setting, by area, as in a config file (docs/configuration.md).",
        f"        {compiled_input}: The compiled values of the settings without a box."])
    return f'''def settings(
    {params},
) -> NamedTuple("Settings", [{returns}]):
    """Check the run's settings as one config, before any step runs; output every field.

    Args:
{arg_docs}
    """
    import json

    from pipelines.run_settings import resolve

    boxes = {{
{box_values}    }}
    box_types = {{
{box_types}    }}
    values = resolve(boxes, box_types, {other_settings}, {compiled_input})
    print("[settings] " + json.dumps(values, sort_keys=True), flush=True)
    names = (
{names}    )
    return tuple(values[name] for name in names)
'''


def settings_function(boxes: list[StepInput], outputs: list[Parameter], other_settings: str,
                      compiled_input: str) -> Callable[..., Any]:
    """The cluster's ``settings`` task as a Python function (its source findable by inspect, as KFP needs)."""
    return _define("settings", settings_function_source(boxes, outputs, other_settings, compiled_input))
