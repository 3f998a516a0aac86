"""The ``mlops`` command line: its examples run, bad settings stop it before any step, only released models are
served, and the monitor judges traffic against the served model's own references."""

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.commands import load_config

ROOT = Path(__file__).resolve().parents[2]


def help_examples() -> list[str]:
    """Every example command ``mlops --help`` prints (lines that start with ``mlops ``)."""
    text = cli.build_parser().format_help()
    return [line.split("#")[0].strip() for line in text.splitlines() if line.strip().startswith("mlops ")]


def readme_examples() -> list[str]:
    """Every ``mlops`` command in the README's code blocks (``.venv/bin/mlops`` or ``mlops``)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split(" #")[0].strip().removeprefix("$ ")
            if command.startswith(".venv/bin/mlops "):
                command = command.removeprefix(".venv/bin/")
            if command.startswith("mlops "):
                lines.append(command)
    return lines


def _parse(command: str):
    argv = shlex.split(command)[1:]
    return cli.build_parser().parse_args(argv)


def test_help_shows_examples_and_every_one_parses():
    examples = help_examples()
    assert len(examples) >= 5
    for command in examples:
        args = _parse(command)  # argparse exits (SystemExit) on an unknown flag or choice
        assert args.func is not None, command


def test_readme_examples_parse():
    examples = readme_examples()
    assert examples, "the README shows mlops commands"
    for command in examples:
        _parse(command)


def test_the_compile_examples_run(tmp_path):
    compiles = [c for c in help_examples() + readme_examples() if c.startswith("mlops compile")]
    assert compiles
    for i, command in enumerate(compiles):
        argv = shlex.split(command)[1:]
        out = tmp_path / f"p{i}.yaml"
        argv = [a if a != "pipeline.yaml" else str(out) for a in argv]
        code = cli.main(argv)
        assert code == 0 and out.is_file(), command


def test_example_configs_and_flags_of_run_examples_are_valid():
    for command in help_examples() + readme_examples():
        if command.startswith("mlops run"):
            args = _parse(command)
            load_config(args)  # raises ConfigError on a bad value


def test_a_bad_config_stops_the_run_at_once_with_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  epochs: 1.5\nfinetune:\n  label_fraction: 3\ndata:\n  source: /no/such/dir\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(bad), "--runs-dir",
                           str(tmp_path / "runs")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for message in ("pretrain.epochs must be a whole number, got 1.5", "finetune.label_fraction must be > 0 and <= 1",
                    "data.source '/no/such/dir' does not exist"):
        assert message in proc.stderr
    assert not (tmp_path / "runs").exists(), "no step may run"
    assert time.monotonic() - started < 60


def test_malformed_yaml_is_a_message_not_a_traceback(tmp_path, run_cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  epochs: [3\n")
    code, _, err = run_cli(["run", "--config", str(bad)])
    assert code == 2 and "not valid YAML at line 3" in err and "Traceback" not in err


# --- mlops serve start: released models only --------------------------------------------------------------------


def _run(runs: Path, run_id: str, blocked_by: tuple[str, ...] = (), mtime: float = 0.0) -> Path:
    run_dir = runs / run_id
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "dataset").mkdir()
    gates = {g: {"passed": g not in blocked_by} for g in ("evaluation", "privacy", "robustness")}
    summary = {"run_id": run_id, "status": "blocked" if blocked_by else "succeeded", "gates": gates,
               "artifacts": {"model": str(run_dir / "model"), "dataset": str(run_dir / "dataset")}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if mtime:
        import os

        os.utime(run_dir / "summary.json", (mtime, mtime))
    return run_dir


@pytest.fixture
def fake_deploy(monkeypatch, tmp_path):
    """deploy_local that records what it was asked to serve and writes a serving state like the real one."""
    served = []

    def deploy_local(model_dir, dataset_dir, serving, **kwargs):
        home = serving.home
        Path(home).mkdir(parents=True, exist_ok=True)
        record = {"endpoint": "http://127.0.0.1:1/predictions/digits", "token_file": str(Path(home) / "token"),
                  "model_dir": str(model_dir), "dataset_dir": str(dataset_dir), "model_version": "v1"}
        (Path(home) / "state.json").write_text(json.dumps(record))
        served.append(model_dir)
        return record

    import components.deploy.local

    monkeypatch.setattr(components.deploy.local, "deploy_local", deploy_local)
    return served


def test_serve_start_serves_the_newest_released_run_not_a_newer_blocked_one(tmp_path, fake_deploy, run_cli):
    runs, home = tmp_path / "runs", tmp_path / "serving"
    released = _run(runs, "released", mtime=1000)
    _run(runs, "blocked", blocked_by=("privacy",), mtime=2000)
    code, out, err = run_cli(["serve", "start", "--runs-dir", str(runs), "--serving-home", str(home)])
    assert code == 0, err
    assert fake_deploy == [str(released / "model")]
    assert json.loads((home / "state.json").read_text())["run_id"] == "released"


def test_serve_start_refuses_a_blocked_run_without_an_override(tmp_path, fake_deploy, run_cli):
    runs, home = tmp_path / "runs", tmp_path / "serving"
    _run(runs, "blocked", blocked_by=("privacy", "robustness"))
    code, _, err = run_cli(["serve", "start", "--runs-dir", str(runs), "--run-id", "blocked",
                            "--serving-home", str(home)])
    assert code == 3 and fake_deploy == []
    assert "blocked by its privacy, robustness gate(s)" in err and "--gates-override-reason" in err
    code, _, err = run_cli(["serve", "start", "--runs-dir", str(runs), "--serving-home", str(home)])
    assert code == 1 and fake_deploy == [] and "no run under" in err, "the default never picks a blocked run"


def test_serve_start_override_needs_a_reason(tmp_path, fake_deploy, run_cli):
    runs = tmp_path / "runs"
    _run(runs, "blocked", blocked_by=("privacy",))
    code, _, err = run_cli(["serve", "start", "--runs-dir", str(runs), "--run-id", "blocked", "--gates-override",
                            "--serving-home", str(tmp_path / "serving")])
    assert code == 2 and "gates.override needs gates.override_reason" in err and fake_deploy == []


def test_serve_start_override_is_recorded(tmp_path, fake_deploy, run_cli):
    runs, home = tmp_path / "runs", tmp_path / "serving"
    run_dir = _run(runs, "blocked", blocked_by=("privacy",))
    code, out, err = run_cli(["serve", "start", "--runs-dir", str(runs), "--run-id", "blocked", "--gates-override",
                              "--gates-override-reason", "demo for the privacy review, ana@example.com",
                              "--serving-home", str(home)])
    assert code == 0, err
    assert fake_deploy == [str(run_dir / "model")]
    assert "WARNING: serving a model its gates did not release" in out
    from components.core.ledger import Ledger

    # The override is kept once, in the release ledger: who, why, what blocked; the serving state points to it.
    (released,) = Ledger(home / "ledger").records()
    assert released.type == "released" and released.data["run_id"] == "blocked" and "@" in released.actor
    assert released.data["override"]["reason"] == "demo for the privacy review, ana@example.com"
    assert "privacy" in released.data["override"]["problem"] and released.id in out
    state = json.loads((home / "state.json").read_text())
    assert state["released_record"] == released.id and "override" not in state
    assert not (home / "overrides.jsonl").exists()


def test_serve_start_never_serves_a_run_without_finished_gates(tmp_path, fake_deploy, run_cli):
    runs = tmp_path / "runs"
    run_dir = _run(runs, "failed")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(status="failed", gates={})
    (run_dir / "summary.json").write_text(json.dumps(summary))
    code, _, err = run_cli(["serve", "start", "--runs-dir", str(runs), "--run-id", "failed", "--gates-override",
                            "--gates-override-reason", "x", "--serving-home", str(tmp_path / "serving")])
    assert code == 1 and fake_deploy == [] and "nothing to serve" in err


# --- mlops monitor: the served model's references -----------------------------------------------------------------


def test_monitor_compares_against_the_served_models_references_not_the_latest_runs(tmp_path, monkeypatch, run_cli):
    import components.monitor.monitor

    runs, home = tmp_path / "runs", tmp_path / "serving"
    served = _run(runs, "served", mtime=1000)
    _run(runs, "newer-blocked", blocked_by=("privacy",), mtime=2000)
    for run_dir in (runs / "served", runs / "newer-blocked"):
        (run_dir / "dataset" / "reference.csv").write_text("pixel_mean\n0.1\n")
        (run_dir / "model" / "reference_model.csv").write_text("confidence\n0.9\n")
    home.mkdir()
    (home / "state.json").write_text(json.dumps({
        "model_dir": str(served / "model"), "dataset_dir": str(served / "dataset"), "model_version": "v1",
        "request_log_dir": str(home / "requests")}))
    seen = {}

    def monitor(reference, log_dir, out_dir, **kwargs):
        seen.update(reference=str(reference), model_reference=kwargs.get("model_reference_csv"),
                    model_version=kwargs.get("model_version"))
        return {"status": "ok", "drift_detected": False, "alert": False, "message": "", "report_html": "r"}

    monkeypatch.setattr(components.monitor.monitor, "monitor", monitor)
    code, out, err = run_cli(["monitor", "--runs-dir", str(runs), "--serving-home", str(home)])
    assert code == 0, err
    assert seen == {"reference": str(served / "dataset" / "reference.csv"),
                    "model_reference": str(served / "model" / "reference_model.csv"), "model_version": "v1"}


def test_monitor_without_serving_state_asks_for_the_reference(tmp_path, run_cli):
    runs = tmp_path / "runs"
    _run(runs, "any")
    code, _, err = run_cli(["monitor", "--runs-dir", str(runs), "--serving-home", str(tmp_path / "none"),
                            "--log-dir", str(tmp_path)])
    assert code == 1 and "pass --reference" in err


# --- conventions: version, help, choices, one spelling per setting, --json ------------------------------------------


def test_version_and_bare_mlops(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as done:
        cli.build_parser().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"mlops {importlib.metadata.version('kfp-mlops')}"
    assert cli.main([]) == 2, "no command is a usage error"
    out = capsys.readouterr().out
    assert out.startswith("usage: mlops") and "doctor" in out and "predict" in out


def _help(argv: list[str]) -> str:
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        cli.build_parser().parse_args(argv)
    return text.getvalue()


def test_run_help_is_short_and_help_all_lists_every_setting():
    from pipelines import config
    from pipelines.commands.run import FIRST_SETTINGS

    short, full = _help(["run", "--help"]), _help(["run", "--help-all"])
    assert len(short.splitlines()) < 150 < len(full.splitlines())
    assert "--pretrain-epochs" in short and "--gates-pgd-steps" not in short
    hidden = len(config.parameters(("gates",))) - len([k for k in FIRST_SETTINGS if k.startswith("gates_")])
    words = " ".join(short.split())
    assert f"{hidden} more gates settings" in words and "mlops config show --area gates" in words
    for p in config.parameters(config.PARAMETER_AREAS):
        assert config.flag_of(p) in full, p.key
    assert "more gates settings" not in full


def test_every_settings_flag_parses_on_run_although_help_hides_it():
    from pipelines import config

    for p in config.parameters(config.PARAMETER_AREAS):
        value = p.choices[-1] if p.choices else p.default
        argv = [f"--{'' if value else 'no-'}{p.key.replace('_', '-')}"] if p.type is bool else \
            [config.flag_of(p), str(value)]
        args = _parse(" ".join(["mlops", "run", *map(shlex.quote, argv)]))
        assert getattr(args, p.key) == value, p.key


def test_each_subcommand_shows_only_its_flags():
    listing = _help(["schedule", "list", "--help"])
    assert "--kfp-host" in listing and "--namespace" in listing
    assert "--pretrain-epochs" not in listing and "--cron" not in listing and len(listing.splitlines()) < 40
    create = _help(["schedule", "create", "--help"])
    assert "--cron" in create and "--pretrain-epochs" in create
    status = _help(["serve", "status", "--help"])
    assert "--serving-home" in status and "--gates-override" not in status and "--run-id" not in status
    assert "--kfp-host" not in _help(["compile", "--help"]), "compile does not connect"


def test_fixed_choice_settings_are_argparse_choices(capsys):
    from pipelines import config

    parser = cli.build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    by_dest = {a.dest: a for a in run._actions}
    fixed = [p for p in config.parameters(config.PARAMETER_AREAS) if p.choices]
    assert {"pretrain_objective", "finetune_mode", "rollout_strategy", "serving_deploy_target"} <= {p.key for p in fixed}
    for p in fixed:
        assert tuple(by_dest[p.key].choices) == p.choices, p.key
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["run", "--rollout-strategy", "blue-green"])
    assert done.value.code == 2 and "choose from 'replace', 'shadow', 'canary'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["submit"], ["schedule", "create", "--cron", "0 3 * * *"], ["schedule", "list"], ["schedule", "pause", "x"],
])
def test_the_kfp_host_is_spelled_kfp_host_everywhere(argv, monkeypatch):
    from pipelines import config

    url = "http://localhost:8888"
    for spelling in ("--kfp-host", "--host", "--cluster-kfp-host"):  # the old ones still parse
        args = cli.build_parser().parse_args([*argv, spelling, url])
        assert load_config(args, config.CLUSTER).cluster.kfp_host == url
    help_text = _help([*argv, "--help"])
    assert "--kfp-host" in help_text and "--host " not in help_text and "--cluster-kfp-host" not in help_text
    monkeypatch.setenv("KFP_HOST", "http://from-env:8888")
    assert load_config(cli.build_parser().parse_args(argv), config.CLUSTER).cluster.kfp_host == "http://from-env:8888"
    args = cli.build_parser().parse_args([*argv, "--kfp-host", url])
    assert load_config(args, config.CLUSTER).cluster.kfp_host == url, "the flag beats the environment"
    assert cli.build_parser().parse_args(["monitor", "--kfp-host", url]).kfp_host == url


def test_schedule_without_an_action_creates_and_an_action_after_the_flags_is_found():
    parser = cli.build_parser()
    assert parser.parse_args(["schedule", "--cron", "0 3 * * *"]).action == "create"
    args = parser.parse_args(["schedule", "--kfp-host", "http://h:1", "--token", "t", "--name", "list", "--cron", "@daily"])
    assert args.action == "create" and args.name == "list", "an option's value is not an action"
    args = parser.parse_args(["schedule", "--kfp-host", "http://h:1", "--token", "t", "pause", "nightly"])
    assert args.action == "pause" and args.target == "nightly" and args.token == "t"


def test_run_json_prints_only_the_summary_on_stdout(tmp_path, monkeypatch, run_cli):
    import pipelines.local

    def run_local(cfg, **kwargs):
        print("[12:00:00] step ingest")  # the run's progress
        return {"run_id": "r1", "status": "blocked", "gates": {}}

    monkeypatch.setattr(pipelines.local, "run_local", run_local)
    code, out, err = run_cli(["run", "--json", "--skip-doctor", "--runs-dir", str(tmp_path)])
    assert code == 3 and json.loads(out) == {"run_id": "r1", "status": "blocked", "gates": {}}
    assert "step ingest" in err and "step ingest" not in out


def test_compile_json(tmp_path, run_cli):
    out_file = tmp_path / "p.yaml"
    code, out, _ = run_cli(["compile", "-o", str(out_file), "--json", "--cluster-image", "r.example.com/x:1"])
    assert code == 0 and json.loads(out)["output"] == str(out_file) and json.loads(out)["image"] == "r.example.com/x:1"


def test_config_show(run_cli):
    code, out, _ = run_cli(["config", "show", "--area", "pretrain", "--pretrain-epochs", "5", "--json"])
    rows = {r["setting"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == {f"pretrain.{n}" for n in __import__("pipelines.config").config.PretrainConfig.__dataclass_fields__}
    assert rows["pretrain.epochs"]["value"] == 5 and rows["pretrain.epochs"]["default"] == 60
    assert rows["pretrain.arch"]["allowed"] == "one of cnn, resnet, vgg" and rows["pretrain.epochs"]["flag"] == "--pretrain-epochs"
    code, out, _ = run_cli(["config", "show", "--area", "cluster", "--target", "cluster"])
    assert code == 0 and "cluster.kfp_host = ''" in out and "--kfp-host" in out


def test_submit_and_schedule_json_against_a_kfp_api(kfp_api, run_cli, monkeypatch):
    """The result alone on stdout (progress on stderr); the host from $KFP_HOST, the token from $KFP_TOKEN."""
    monkeypatch.setenv("KFP_HOST", kfp_api.url)
    monkeypatch.setenv("KFP_TOKEN", "good-token")
    kfp_api.run_states = ["PENDING", "RUNNING", "SUCCEEDED"]
    code, out, err = run_cli(["submit", "--json", "--wait", "--poll-s", "0.01", "--pretrain-epochs", "3"])
    assert code == 0, err
    result = json.loads(out)
    assert result["run_id"] in kfp_api.runs and result["state"] == "SUCCEEDED" and result["exit_code"] == 0
    assert result["url"] == f"{kfp_api.url}/#/runs/details/{result['run_id']}"
    assert "RUNNING" in err and "SUCCEEDED" in err
    code, out, err = run_cli(["schedule", "create", "--cron", "0 3 * * *", "--name", "nightly", "--json"])
    assert code == 0, err
    created = json.loads(out)
    assert created["name"] == "nightly" and created["enabled"] and created["cron"] == "0 0 3 * * *"
    code, out, _ = run_cli(["schedule", "list", "--json"])
    assert code == 0 and [s["recurring_run_id"] for s in json.loads(out)] == [created["recurring_run_id"]]
    code, out, err = run_cli(["schedule", "pause", "nightly", "--json"])
    assert code == 0 and json.loads(out)["enabled"] is False and "paused" in err
