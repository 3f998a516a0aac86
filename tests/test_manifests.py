"""The kustomize tree renders offline, and restricted pod security is in the base."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MANIFESTS = Path(__file__).parent.parent / "manifests"
OVERLAYS = sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is needed for 'kubectl kustomize'")


def render(path: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("overlay", ["base"] + OVERLAYS)
def test_renders(overlay):
    path = MANIFESTS / "base" if overlay == "base" else MANIFESTS / "overlays" / overlay
    objects = render(path)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount"} <= kinds
    namespace = next(o for o in objects if o["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == namespace["metadata"]["name"], o["metadata"]["name"]
