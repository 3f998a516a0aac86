"""The unbatched route: a lone request is answered without waiting for a batch that will not come.

TorchServe 0.12's batch aggregator (``Model.pollBatch`` in the frontend) takes the first queued request, then
polls for each next one with the rest of ``maxBatchDelay``, also when nothing is queued, so a lone request always
waits the whole delay. ``maxBatchDelay: 0`` does not help: the archive's 0 reads as "not set" (TorchServe's default,
100 ms), and 0 from ``config.properties`` ends every batch after its second request. So the same model is
registered twice: as built (batched) and as ``<name>-unbatched`` (``batchSize: 1``, one worker, the same weights and
handler, so the same answers and the same request log). The auth proxy sends a prediction to the unbatched model
only when it has no other request in flight to TorchServe, and to the batched one otherwise (``PredictionRoutes``).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

UNBATCHED_SUFFIX = "-unbatched"
PREDICTIONS = "/predictions/"


def unbatched_name(model_name: str) -> str:
    return f"{model_name}{UNBATCHED_SUFFIX}"


def write_unbatched_archive(mar_path: str | Path, out_path: str | Path) -> Path:
    """A copy of the .mar whose model config says one worker and batches of one; every other file and setting kept."""
    out_path = Path(out_path)
    with zipfile.ZipFile(mar_path) as source:
        config_file = json.loads(source.read("MAR-INF/MANIFEST.json"))["model"].get("configFile")
        if not config_file:
            raise ValueError(f"{mar_path} has no model config: build it with serving.archive.build_mar")
        text = source.read(config_file).decode()
        for key, value in (("minWorkers", 1), ("maxWorkers", 1), ("batchSize", 1)):
            text, found = re.subn(rf"^{key}:.*$", f"{key}: {value}", text, flags=re.MULTILINE)
            if not found:
                text += f"{key}: {value}\n"
        tmp = out_path.with_name(out_path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as target:
            for item in source.infolist():
                target.writestr(item, text.encode() if item.filename == config_file else source.read(item))
    tmp.replace(out_path)
    return out_path


class PredictionRoutes:
    """Which model a prediction goes to: ``routes`` maps a batched model to its unbatched twin.

    The proxy counts its requests in flight to TorchServe (one event loop: no lock needed). A prediction for a
    routed model that finds none in flight goes to the twin; any other waits for the batch it will share."""

    def __init__(self, routes: dict[str, str]):
        self.routes = dict(routes)
        self.internal = set(self.routes.values())  # clients name the model, never its twin
        self.in_flight = 0

    def target(self, method: str, path: str, target: str) -> str:
        """The request target to forward: ``target`` itself or the same with the twin's name."""
        if method != "POST" or not path.startswith(PREDICTIONS) or self.in_flight:
            return target
        twin = self.routes.get(path[len(PREDICTIONS):])
        return PREDICTIONS + twin + target[len(path):] if twin else target

    def is_internal(self, path: str) -> bool:
        _, _, rest = path.partition("/")[2].partition("/")
        return path.startswith(("/predictions/", "/explanations/")) and rest.split("/")[0] in self.internal


def parse_route(text: str) -> tuple[str, str]:
    """``NAME=TWIN`` (the proxy's ``--unbatched-model``) -> (NAME, TWIN)."""
    name, sep, twin = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not re.fullmatch(r"[A-Za-z0-9_-]+", twin):
        raise ValueError(f"--unbatched-model must be MODEL=TWIN (letters, digits, '-', '_'), got {text!r}")
    return name, twin
