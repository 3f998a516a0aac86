"""Find the model in production (the champion) as a local classifier artifact directory.

The evaluate step compares the new model (the challenger) with it on the same
test split. Where the champion lives:

* ``champion_model == "store"``: the latest release in the model store (the
  ``model_store_uri`` given, else ``$KFP_MLOPS_MODEL_STORE``): the cluster default,
  where the serving pods fetch what they serve from that store. A store with no
  release yet means no model in production.
* ``champion_model`` a location: a classifier directory (``model.safetensors`` +
  ``metadata.json``), a TorchServe ``.mar`` (a zip holding the same two files),
  a directory holding one of these, or a storage release published with
  ``components.core.releases.publish`` (an ``s3://`` base URI, optionally ending in
  ``/latest``, or a local directory with a ``latest`` pointer) -- fetched and
  checksum-verified through ``components.core.releases.fetch``.
* ``champion_model == "serving"`` (or empty): the local serving home. Its ``state.json`` (the
  deployment record) names the served model; the champion is its ``model_dir``
  when the record carries one that still exists, otherwise the ``.mar`` in the
  home's model store (what TorchServe actually loads). The last deployed model
  counts as the champion even when its server is stopped right now: a stopped
  server must not let a worse model through.
* ``champion_model == "none"``: no comparison.

Nothing found (no ``state.json``) means no model in production: the champion
check passes with that reason. A deployment that is recorded but whose model
cannot be found raises, so a lost artifact never silently skips the check.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.core.models import METADATA_FILE, WEIGHTS_FILE
from components.core.names import MODEL_STORE_ENV

DISABLED = "none"
SERVING = "serving"  # the model the local serving home serves
STORE = "store"  # the latest release in the model store
STATE_FILE = "state.json"  # as serving.server.STATE_FILE; read here without importing the server
MODEL_STORE = "model-store"
POINTER_FILE = "latest"  # as components.core.releases.POINTER_NAME
MANIFEST_FILE = "MAR-INF/MANIFEST.json"


class ChampionNotComparable(ValueError):
    """The champion was trained for other classes or other images: the same test split cannot score both."""


@dataclass
class ChampionLookup:
    """Where the champion was looked for and, if found, its unpacked artifact directory."""

    status: str  # "found", "no_champion" or "disabled"
    model_dir: Path | None = None
    source: str = ""  # where it was found (a path or URI a person can check)
    reason: str = ""  # why there is none
    serving: bool | None = None  # whether its local server runs right now (None: not a local serving home)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "source": self.source}
        if self.serving is not None:
            out["champion_serving"] = self.serving
        return out


def _is_model_dir(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() and (path / METADATA_FILE).is_file()


def extract_mar(mar: str | Path, dest: str | Path) -> Path:
    """Unpack the classifier artifact (weights + metadata) from a TorchServe .mar into ``dest``.

    Only those two members are read, by name, so nothing in the archive can
    write outside ``dest``; the handler and manifest are not needed to score it.
    """
    mar, dest = Path(mar), Path(dest)
    try:
        archive = zipfile.ZipFile(mar)
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{mar} is not a readable model archive (.mar is a zip): {err}") from None
    with archive:
        names = set(archive.namelist())
        missing = [n for n in (WEIGHTS_FILE, METADATA_FILE) if n not in names]
        if missing:
            raise ValueError(f"model archive {mar} lacks {', '.join(missing)}: it was not built by "
                             "serving.archive.build_mar from a classifier artifact")
        dest.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS_FILE, METADATA_FILE):
            (dest / name).write_bytes(archive.read(name))
        if MANIFEST_FILE in names:  # keep the archive's version when the metadata has none
            metadata = json.loads((dest / METADATA_FILE).read_text())
            if not metadata.get("model_version"):
                version = json.loads(archive.read(MANIFEST_FILE)).get("model", {}).get("modelVersion")
                if version:
                    metadata["model_version"] = version
                    (dest / METADATA_FILE).write_text(json.dumps(metadata))
    return dest


def _model_in(path: Path, work_dir: Path) -> Path:
    """The classifier artifact inside ``path`` (itself, a .mar, or exactly one of them below it)."""
    if path.is_file():
        if path.suffix == ".mar" or zipfile.is_zipfile(path):
            return extract_mar(path, work_dir / "unpacked")
        raise ValueError(f"{path} is neither a model directory nor a .mar archive")
    if _is_model_dir(path):
        return path
    model_dirs = sorted({p.parent for p in path.rglob(METADATA_FILE) if _is_model_dir(p.parent)})
    archives = sorted(path.rglob("*.mar"))
    for found in (model_dirs, archives):  # an unpacked model wins over an archive of (probably) the same
        if len(found) == 1:
            return _model_in(found[0], work_dir)
    found = model_dirs + archives
    if not found:
        raise FileNotFoundError(f"no model in {path}: expected {WEIGHTS_FILE} + {METADATA_FILE} or a .mar archive")
    raise ValueError(f"{path} holds {len(found)} models ({', '.join(str(f) for f in found[:5])}); point champion_model at one")


def release_base(spec: str) -> str | None:
    """The base URI/dir of a storage release named by ``spec`` (with or without ``/latest``), or None if it is not one."""
    spec = spec.rstrip("/")
    base = spec[: -len("/" + POINTER_FILE)] if spec.endswith("/" + POINTER_FILE) else spec
    if spec.startswith("s3://") or (Path(base) / POINTER_FILE).is_file():
        return base
    return None


def materialize(champion_model: str, work_dir: str | Path) -> tuple[Path, str]:
    """A local classifier directory for ``champion_model`` (path, .mar or storage release); returns (dir, source)."""
    work_dir = Path(work_dir)
    spec = champion_model.strip()
    base = release_base(spec)
    if base is not None:
        try:
            from components.core.releases import fetch
        except ImportError as err:
            raise RuntimeError(f"champion_model {spec!r} is a storage release, but components.core.releases cannot be "
                               f"imported ({err}); install the project with its storage dependencies") from None
        manifest = fetch(base, work_dir / "fetched")
        print(f"[champion] fetched release {manifest.get('version', '?')[:12]} from {base}", flush=True)
        return _model_in(work_dir / "fetched", work_dir), f"{base} (release {manifest.get('version', '?')[:12]})"
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"champion_model {spec!r} does not exist: give a model directory, a .mar, a storage "
                                f"release URI, '{SERVING}' for the locally served model, '{STORE}' for the model store's "
                                f"latest release, or '{DISABLED}' to skip the comparison")
    return _model_in(path, work_dir), str(path)


def _server_running(home: Path) -> bool | None:
    try:
        from serving.server import LocalTorchServe

        return bool(LocalTorchServe(home).status()["running"])
    except Exception:  # noqa: BLE001 - only informational; the champion is the deployed model either way
        return None


def from_serving_home(home: str | Path, work_dir: str | Path) -> ChampionLookup:
    """The model deployed from a local serving home, per its ``state.json`` and model store."""
    home, work_dir = Path(home), Path(work_dir)
    state_file = home / STATE_FILE
    if not state_file.is_file():
        return ChampionLookup("no_champion", source=str(state_file),
                              reason=f"no model in production (no deployment recorded at {state_file})")
    try:
        state = json.loads(state_file.read_text())
    except ValueError as err:
        raise ValueError(f"{state_file} is not valid JSON ({err}); repair it, remove it if nothing is deployed, "
                         f"or set champion_model explicitly") from None
    serving = _server_running(home)
    recorded = state.get("model_dir")
    if recorded and _is_model_dir(Path(recorded)):
        return ChampionLookup("found", Path(recorded), source=str(recorded), serving=serving)
    name = state.get("model_name")
    store = home / MODEL_STORE
    candidates = [store / f"{name}.mar"] if name else sorted(store.glob("*.mar"))
    mars = [m for m in candidates if m.is_file()]
    if len(mars) == 1:
        return ChampionLookup("found", extract_mar(mars[0], work_dir / "unpacked"), source=str(mars[0]), serving=serving)
    where = f"model_dir {recorded!r} and " if recorded else ""
    raise FileNotFoundError(
        f"{state_file} records a deployment of model {name!r} (version {state.get('model_version')!r}) but its "
        f"model cannot be found: {where}{', '.join(str(c) for c in candidates) or store / '*.mar'} "
        f"{'are' if len(candidates) != 1 else 'is'} missing or ambiguous. Set champion_model to the served model, "
        f"'{DISABLED}' to skip the comparison, or remove the stale {state_file}."
    )


def resolve_champion(champion_model: str, serving_home: str | Path | None, work_dir: str | Path,
                     model_store_uri: str = "") -> ChampionLookup:
    """Find the champion: none, the model store's latest release, the local serving home, or a given location."""
    spec = (champion_model or SERVING).strip()
    if spec.lower() == DISABLED:
        return ChampionLookup("disabled", reason=f"champion comparison disabled (champion_model={DISABLED!r})")
    if spec.lower() == STORE:
        return from_model_store(model_store_uri or os.environ.get(MODEL_STORE_ENV, ""), work_dir)
    if spec.lower() == SERVING:
        if not serving_home:
            return ChampionLookup("no_champion", reason="no model in production (no serving home given)")
        return from_serving_home(serving_home, work_dir)
    model_dir, source = materialize(spec, work_dir)
    return ChampionLookup("found", model_dir, source=source)


def from_model_store(store: str, work_dir: str | Path) -> ChampionLookup:
    """The latest release in the model store; none when the store has no release yet."""
    store = store.rstrip("/")
    if not store:
        raise ValueError(f"champion_model '{STORE}' needs the model store: set serving.model_store_uri or "
                         f"{MODEL_STORE_ENV} (the kfp-mlops-storage ConfigMap), or champion_model '{DISABLED}'")
    from components.core import blobs

    pointer = f"{store}/{POINTER_FILE}"
    if not blobs.exists(pointer):
        return ChampionLookup("no_champion", source=pointer,
                              reason=f"no model in production (no release in the model store {store} yet)")
    model_dir, source = materialize(store, work_dir)
    return ChampionLookup("found", model_dir, source=source)


def check_comparable(model_dir: str | Path, splits) -> None:
    """Raise :class:`ChampionNotComparable` unless the champion predicts the dataset's classes from its image shape."""
    meta_path = Path(model_dir) / METADATA_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the champion's {meta_path}: {err}") from None
    champion_classes = [str(c) for c in meta.get("class_names", [])]
    if champion_classes != [str(c) for c in splits.class_names]:
        raise ChampionNotComparable(f"it predicts classes {champion_classes} but this test split has "
                                    f"{list(splits.class_names)}")
    channels, height = splits.test_x.shape[1], splits.test_x.shape[2]
    encoder = meta.get("encoder") or {}
    if encoder.get("in_channels") not in (None, channels) or encoder.get("image_size") not in (None, height):
        raise ChampionNotComparable(f"it takes {encoder.get('in_channels')}-channel {encoder.get('image_size')}px "
                                    f"images but this test split has {channels}-channel {height}px images")
