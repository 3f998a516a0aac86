"""The layout's rules, checked on the source: the library imports no step, no step imports another, nothing under
components/ imports pipelines/, serving/ imports only components.core, no import cycle, no oversized module."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("components", "pipelines", "serving")
STEPS = ("ingest", "pretrain", "finetune", "evaluate", "privacy", "robustness", "record", "deploy", "monitor")
MAX_LINES = 600


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules a module imports (anywhere in it: lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.rsplit(".", node.level)[0] if path.name != "__init__.py" else name
                base = f"{package}.{base}" if base else package
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found - {name}


GRAPH = {name: imports_of(path, name, set(modules())) for name, path in modules().items()}


def _step_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "components" and parts[1] in STEPS else None


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("components")))
def test_components_never_import_pipelines(module):
    assert not {m for m in GRAPH[module] if m.startswith("pipelines")}, module


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _step_of(m)))
def test_no_step_imports_another_step(module):
    others = {m for m in GRAPH[module] if _step_of(m) and _step_of(m) != _step_of(module)}
    assert not others, f"{module} imports {others}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith(("components.core", "components.train"))))
def test_the_library_imports_no_step(module):
    assert not {m for m in GRAPH[module] if _step_of(m)}, module


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("serving")))
def test_serving_imports_only_the_core_library(module):
    outside = {m for m in GRAPH[module] if m.startswith(("components.", "pipelines"))
               and not m.startswith("components.core")}
    assert not outside, f"{module} imports {outside}"


def test_there_is_no_import_cycle():
    state: dict[str, int] = {}  # 1 visiting, 2 done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for nxt in sorted(GRAPH.get(module, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_no_module_is_over_600_lines_unless_the_architecture_says_why():
    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    explained = set(re.findall(r"`([\w/]+\.py)` \(over 600 lines", architecture))
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= explained, {k: v for k, v in long.items() if k not in explained}


def test_the_tests_have_one_conftest():
    """A nested conftest.py is imported as the module "conftest" too and shadows tests/conftest.py for every test
    that imports helpers from it (``from conftest import settings_of``): fixtures of nested folders live in
    tests/conftest.py."""
    tests = Path(__file__).resolve().parent
    assert sorted(p.relative_to(tests).as_posix() for p in tests.rglob("conftest.py")) == ["conftest.py"]
