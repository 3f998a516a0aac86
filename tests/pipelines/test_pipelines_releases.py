"""``mlops releases``: list, show, diff on a realistic ledger, and rollback / promote on the local server (each
recorded with who and why), in tmp homes; (slow) a real rollback and promotion between two served models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ledger_chain import build_chain

from components.core.ledger import Ledger
from pipelines import cli


@pytest.fixture
def chain(tmp_path):
    home = tmp_path / "serving"
    return build_chain(Ledger(home / "ledger"), tmp_path), home


def test_releases_help_is_short_and_every_action_parses(run_cli):
    text = cli.build_parser().format_help()
    assert "releases" in text and "mlops releases show" in text
    for argv in (["releases", "list", "--json"], ["releases", "show", "3f2a"], ["releases", "diff", "a", "b"],
                 ["releases", "rollback", "--to", "3f", "--reason", "x"], ["releases", "promote", "3f", "--reason", "x"]):
        assert cli.build_parser().parse_args(argv).func is not None
    subparsers = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    releases_help = subparsers["releases"].format_help()
    assert len(releases_help.splitlines()) < 25
    with pytest.raises(SystemExit):  # a rollback says why
        cli.build_parser().parse_args(["releases", "rollback"])


def test_list_shows_each_released_version_and_its_status(chain, run_cli):
    c, home = chain
    code, out, err = run_cli(["releases", "list", "--ledger", str(home / "ledger")])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["VERSION", "RELEASED", "(UTC)", "TARGET", "STRATEGY", "STATUS", "RUN"]
    assert lines[1].split()[0] == c.v1[:12] and lines[1].split()[-2:] == ["superseded", "run1"]
    assert lines[2].split()[0] == c.v2[:12] and lines[2].split()[-3:] == ["shadow", "production", "run2"]
    code, out, _ = run_cli(["releases", "list", "--json", "--ledger", str(home / "ledger")])
    rows = json.loads(out)
    assert [(r["version"], r["status"], r["run"], r["record"]) for r in rows] == [
        (c.v1, "superseded", "run1", c.released1.id), (c.v2, "production", "run2", c.released2.id)]


def test_list_finds_the_ledger_from_the_config(chain, tmp_path, run_cli):
    c, home = chain
    config = tmp_path / "serving.yaml"
    config.write_text(f"serving:\n  home: {home}\n")
    code, out, _ = run_cli(["releases", "list", "--config", str(config)])
    assert code == 0 and c.v2[:12] in out
    code, out, _ = run_cli(["releases", "list", "--ledger", str(tmp_path / "empty")])
    assert code == 0 and "No release recorded" in out


def test_show_walks_back_to_the_run_and_forward_to_the_retrain_and_next_release(chain, run_cli):
    c, home = chain
    ledger = ["--ledger", str(home / "ledger")]
    code, out, err = run_cli(["releases", "show", c.v1[:6], *ledger])
    assert code == 0, err
    back, forward = out.split("What followed:")
    assert f"Model v{c.v1}: superseded" in back
    for text in ("trained", "run run1", f"config sha256 {c.trained1.data['config_sha256'][:12]}",
                 f"card sha256 {c.trained1.data['data_card_sha256'][:12]}", "privacy     passed: membership-inference"):
        assert text in back, text
    kinds = [line.split()[0] for line in forward.splitlines()
             if line.startswith("  ") and not line.startswith("    ")]
    assert kinds == ["drift", "retrain_started", "trained", "gated", "released", "promoted"]
    assert "run run2 (local), because of drift " + c.drift.id in forward
    code, out, _ = run_cli(["releases", "show", c.v2[:8], "--json", *ledger])
    view = json.loads(out)
    assert view["status"] == "production" and [r["type"] for r in view["back"]][:3] == ["released", "gated", "trained"]
    assert {r["type"] for r in view["back"]} >= {"drift", "retrain_started"}, "its cause: the drift of v1"


def test_diff_compares_metrics_gates_and_config(chain, run_cli):
    c, home = chain
    code, out, err = run_cli(["releases", "diff", c.v1[:8], c.v2[:8], "--json", "--ledger", str(home / "ledger")])
    assert code == 0, err
    view = json.loads(out)
    assert view["config"] == {"pretrain.epochs": [3, 5]}, "only the fields that differ"
    assert view["gates"]["privacy"] == ["passed", "passed"]
    assert view["metrics"]["evaluation.test_accuracy"] == [0.97, 0.97]
    assert view["facts"]["run"] == ["run1", "run2"]
    code, out, _ = run_cli(["releases", "diff", c.v1[:8], c.v2[:8], "--ledger", str(home / "ledger")])
    assert "pretrain.epochs" in out and "config (changed fields):" in out


def test_unknown_or_ambiguous_versions_are_clear_errors(chain, run_cli):
    _, home = chain
    code, _, err = run_cli(["releases", "show", "ffff", "--ledger", str(home / "ledger")])
    assert code == 1 and "no released model version starts with 'ffff'" in err


@pytest.fixture
def fake_serve(monkeypatch):
    """deploy_local recording what it serves, and writing a serving state like the real one."""
    served = []

    def deploy_local(model_dir, dataset_dir, serving, **kwargs):
        home = Path(serving.home)
        home.mkdir(parents=True, exist_ok=True)
        version = json.loads((Path(model_dir) / "metadata.json").read_text())["model_version"]
        record = {"endpoint": f"http://127.0.0.1:{serving.inference_port}/predictions/digits", "token_file": "t",
                  "model_dir": str(model_dir), "dataset_dir": str(dataset_dir), "model_version": version}
        (home / "state.json").write_text(json.dumps(record))
        served.append(version)
        return record

    import components.deploy.local

    monkeypatch.setattr(components.deploy.local, "deploy_local", deploy_local)
    return served


def test_rollback_and_promote_on_the_local_server_are_recorded_with_who_and_why(chain, fake_serve, run_cli):
    c, home = chain
    where = ["--serving-home", str(home)]
    code, out, err = run_cli(["releases", "rollback", "--reason", "pager: accuracy complaints", *where])
    assert code == 0, err
    assert fake_serve == [c.v1], "the version that served before"
    ledger = Ledger(home / "ledger")
    rolled_back, released = ledger.records()[-2:]
    assert rolled_back.type == "rolled_back" and rolled_back.data["model_version"] == c.v2
    assert rolled_back.parents == (c.released2.id,) and rolled_back.data["reason"] == "pager: accuracy complaints"
    assert released.data["strategy"] == "rollback" and released.data["model_version"] == c.v1
    assert set(released.parents) == {c.released1.id, rolled_back.id} and "@" in released.actor
    assert released.data["model_dir"] == c.released1.data["model_dir"], "where its model is, for the next time"
    assert ledger.in_production().id == released.id and ledger.status(c.v2) == "rolled back"
    assert json.loads((home / "state.json").read_text())["released_record"] == released.id
    assert f"rolled_back {rolled_back.id}" in out

    code, _, err = run_cli(["releases", "rollback", "--reason", "again", *where])
    assert code == 1 and "nothing served before" in err, "v2 was rolled back: it is no candidate"

    code, out, err = run_cli(["releases", "promote", c.v2[:7], "--reason", "fixed upstream, ana", *where])
    assert code == 0, err
    assert fake_serve == [c.v1, c.v2]
    released, promoted = Ledger(home / "ledger").records()[-2:]
    assert (released.data["strategy"], promoted.type, promoted.parents) == ("promote", "promoted", (released.id,))
    assert promoted.data == {"model_version": c.v2, "reason": "fixed upstream, ana", "automatic": False,
                             "replaced_version": c.v1}
    assert Ledger(home / "ledger").in_production().id == released.id

    code, _, err = run_cli(["releases", "promote", c.v2[:7], "--reason", "twice", *where])
    assert code == 1 and "already in production" in err and fake_serve == [c.v1, c.v2]


def test_a_failed_serve_records_nothing(chain, monkeypatch, run_cli):
    c, home = chain
    import components.deploy.local

    def broken(*args, **kwargs):
        raise RuntimeError("smoke test of http://127.0.0.1:1 failed, server stopped")

    monkeypatch.setattr(components.deploy.local, "deploy_local", broken)
    before = len(Ledger(home / "ledger").records())
    code, _, err = run_cli(["releases", "rollback", "--reason", "x", "--serving-home", str(home)])
    assert code == 1 and "smoke test" in err
    assert len(Ledger(home / "ledger").records()) == before


def test_a_model_that_is_gone_cannot_be_served_again(chain, run_cli):
    import shutil

    c, home = chain
    shutil.rmtree(c.released1.data["model_dir"])
    code, _, err = run_cli(["releases", "rollback", "--reason", "x", "--serving-home", str(home)])
    assert code == 1 and "cannot be served here" in err and "not found" in err


@pytest.mark.slow
def test_a_real_rollback_and_promotion_between_served_models(tmp_path, known_model, weak_model, dataset_dir, run_cli):
    """The real local server: rollback serves the earlier model again, promote the later one; a promotion whose
    smoke test fails serves the model in production again and records nothing."""
    import shutil

    from components.core.data import load_splits
    from serving.client import predict
    from serving.processes import free_port
    from serving.server import LocalTorchServe

    home = tmp_path / "serving"
    ledger = Ledger(home / "ledger")
    second = tmp_path / "known-2"  # the same weights released again under a new version
    shutil.copytree(known_model[0], second)
    metadata = json.loads((second / "metadata.json").read_text())
    (second / "metadata.json").write_text(json.dumps({**metadata, "model_version": "known-2"}))
    where = ["--serving-home", str(home), "--serving-inference-port", str(free_port()),
             "--serving-management-port", str(free_port()), "--serving-metrics-port", str(free_port())]
    for run, model, version in (("weak", weak_model, "weak-1"), ("first", known_model[0], "known-1"),
                                ("second", second, "known-2")):
        ledger.append("released", {"model_name": "digits", "model_version": version, "target": "local",
                                   "endpoint": "http://127.0.0.1:1/predictions/digits",
                                   "strategy": "replace" if run != "weak" else "canary", "run_id": run,
                                   "model_dir": str(model), "dataset_dir": str(dataset_dir)})
    image = _png(load_splits(dataset_dir).test_x[0])

    def served() -> str:
        state = json.loads((home / "state.json").read_text())
        return predict(state["endpoint"], image, _token(state["token_file"]))["model_version"]

    try:
        code, _, err = run_cli(["releases", "rollback", "--reason", "known-2 misreads sevens", *where])
        assert code == 0, err
        assert served() == "known-1" and ledger.in_production().data["model_version"] == "known-1"
        code, _, err = run_cli(["releases", "promote", "known-2", "--reason", "fixed", *where])
        assert code == 0, err
        assert served() == "known-2"
        before = [r.type for r in Ledger(home / "ledger").records()]
        code, _, err = run_cli(["releases", "promote", "weak", "--reason", "try the weak one", *where])
        assert code == 1 and "smoke test" in err and "known-2 serves again, nothing recorded" in err
        assert served() == "known-2" and [r.type for r in Ledger(home / "ledger").records()] == before
        assert before == ["released"] * 3 + ["rolled_back", "released", "released", "promoted"]
    finally:
        LocalTorchServe(home).stop(quiet=True)


def _png(image) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.asarray(image)[0] * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _token(path) -> str:
    return Path(path).read_text().split()[0]
