"""``mlops runs list|show|compare`` and ``mlops ui --build-only`` through ``mlops``'s own entry point."""

import json
import socket

import pytest

from pipelines.cli import main

ROW_KEYS = {"run_id", "status", "started_at", "seconds", "model_version", "test_accuracy", "gates", "blocked_by",
            "failed_step", "cost", "runner", "in_production", "problem", "run_dir"}


@pytest.fixture
def runs(make_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default config's serving home, runs/serving, is this test's
    make_run("a-old", mtime=1_700_000_000, config={"pretrain": {"epochs": 3}})
    make_run("b-new", "blocked", mtime=1_700_000_500, accuracy=0.5, config={"pretrain": {"epochs": 5}})
    (tmp_path / "runs" / "serving").mkdir()
    (tmp_path / "runs" / "serving" / "state.json").write_text(json.dumps({"model_version": "v1", "run_id": "a-old"}))
    return make_run


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_list_json_has_the_documented_keys(runs, capsys):
    out = run_json(capsys, "runs", "list", "--json")
    assert out["schema"] == "kfp-mlops/runs-v1" and out["production"]["run_id"] == "a-old"
    assert [r["run_id"] for r in out["runs"]] == ["b-new", "a-old"]
    assert set(out["runs"][0]) == ROW_KEYS
    assert [r["in_production"] for r in out["runs"]] == [False, True]
    assert main(["runs", "list"]) == 0
    text = capsys.readouterr().out
    assert "b-new" in text and "eval:NO" in text


def test_show_defaults_to_the_newest_run(runs, capsys):
    out = run_json(capsys, "runs", "show", "--json")
    assert out["run"]["run_id"] == "b-new" and out["run"]["blocked_by"] == ["evaluation"]
    assert {"steps", "gates_detail", "metrics", "reports", "config"} <= set(out["run"])
    assert main(["runs", "show", "a-old"]) == 0
    assert "Run a-old: SUCCEEDED  [in production]" in capsys.readouterr().out
    assert main(["runs", "show", "zzz"]) == 1
    assert "no run 'zzz'" in capsys.readouterr().err


def test_compare_needs_two_runs(runs, capsys):
    out = run_json(capsys, "runs", "compare", "a-old", "b-new", "--json")
    assert out["runs"] == ["a-old", "b-new"]
    epochs = next(r for r in out["rows"] if r["key"] == "pretrain.epochs")
    assert epochs["values"] == [3, 5] and epochs["differs"] is True
    assert main(["runs", "compare", "a-old", "b-new"]) == 0
    assert "* config.pretrain.epochs" in capsys.readouterr().out
    assert main(["runs", "compare", "a-old"]) == 2
    assert "at least two" in capsys.readouterr().err


def test_ui_build_only_writes_the_static_site(runs, tmp_path, capsys):
    assert main(["ui", "--build-only"]) == 0
    assert "file://" in capsys.readouterr().out
    assert (tmp_path / "runs" / "ui" / "run" / "b-new.html").is_file()
    assert main(["ui", "--build-only", "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "index.html").is_file()
    assert main(["ui", "--host", "0.0.0.0", "--port", "0"]) == 1
    assert "--allow-remote" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["ui", "--port", str(taken.getsockname()[1])]) == 1
    assert "pass another --port" in capsys.readouterr().err
