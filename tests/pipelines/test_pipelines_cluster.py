"""mlops submit / mlops schedule against a loopback KFP API that validates every request.

The fake (tests/kfp_api_server.py) checks each body against the kfp_server_api v2beta1
models and the API server's rules, so these tests fail on a request a real KFP would
reject or misread, not only on a wrong call sequence.
"""

import hashlib
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from kfp_api_server import FakeKfpApi, robfig_parse  # tests/, on the path as conftest's folder

from pipelines.cli import main
from pipelines.cluster import connection, runs, schedules
from pipelines.config import CLUSTER, Config
from pipelines.config import defaults as config_defaults
from pipelines.pipeline import run_parameters

TOKEN = "good-token"


_COMPILED: dict[str, bytes] = {}


@pytest.fixture(autouse=True)
def compile_once_per_cluster_config(monkeypatch):
    """The real compile, memoised per ClusterConfig: these tests are about the API calls."""
    real_compile_to = runs.compile_to

    def compile_to(path, cluster_config):
        key = repr(cluster_config)
        if key not in _COMPILED:
            real_compile_to(path, cluster_config)
            _COMPILED[key] = Path(path).read_bytes()
        Path(path).write_bytes(_COMPILED[key])
        return hashlib.sha256(_COMPILED[key]).hexdigest()

    monkeypatch.setattr(runs, "compile_to", compile_to)


def _cli(kfp_api, *args):
    return main([args[0], "--host", kfp_api.url, "--token", TOKEN, *args[1:]])


def _run_bodies(kfp_api):
    return [r.body for r in kfp_api.calls("POST", "/runs")]


# --- submit ---------------------------------------------------------------------------

def test_submit_uploads_then_adds_a_version_then_reuses_an_identical_one(kfp_api, capsys):
    assert _cli(kfp_api, "submit", "--pretrain-epochs", "3") == 0
    assert len(kfp_api.calls("POST", "/pipelines/upload")) == 1
    assert not kfp_api.calls("POST", "/pipelines/upload_version")
    (first_pipeline,) = kfp_api.pipelines.values()
    assert first_pipeline["display_name"] == "kfp-mlops" and first_pipeline["namespace"] == "kfp-mlops"

    # another image = another compile: a new version of the same pipeline, not a second pipeline
    assert _cli(kfp_api, "submit", "--cluster-image", "registry.example.com/kfp-mlops:0.2.0") == 0
    (upload_version,) = kfp_api.calls("POST", "/pipelines/upload_version")
    assert upload_version.query["pipelineid"] == first_pipeline["pipeline_id"]
    assert len(kfp_api.pipelines) == 1 and len(kfp_api.versions) == 2

    # the same compile again reuses its version
    assert _cli(kfp_api, "submit", "--cluster-image", "registry.example.com/kfp-mlops:0.2.0") == 0
    assert len(kfp_api.versions) == 2 and len(kfp_api.calls("POST", "/pipelines/upload_version")) == 1

    assert len(kfp_api.calls("POST", "/experiments")) == 1, "the experiment is created once, then found"
    runs = _run_bodies(kfp_api)
    assert len(runs) == 3
    new_version_id = next(v for v in kfp_api.versions.values() if v["display_name"] != "kfp-mlops")["pipeline_version_id"]
    assert [r["pipeline_version_reference"]["pipeline_version_id"] for r in runs[1:]] == [new_version_id] * 2
    out = capsys.readouterr().out
    assert "uploaded new pipeline" in out and "uploaded new version" in out and "reusing the identical version" in out


def test_run_carries_the_config_parameters_and_service_account_never_credentials(kfp_api, tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("finetune:\n  epochs: 7\ncluster:\n  service_account: trainer\n  experiment: nightly\n")
    assert _cli(kfp_api, "submit", "--config", str(config_file), "--data-seed", "5", "--run-name", "try 1") == 0
    run = _run_bodies(kfp_api)[0]
    expected = config_defaults(CLUSTER)
    expected.finetune.epochs, expected.data.seed = 7, 5
    assert run["runtime_config"]["parameters"] == run_parameters(expected)
    # the run form's boxes, and in other_settings only what differs from the compiled values
    assert run["runtime_config"]["parameters"]["finetune_epochs"] == 7
    assert run["runtime_config"]["parameters"]["other_settings"] == {"data": {"seed": 5}}
    assert run["service_account"] == "trainer"
    assert _cli(kfp_api, "submit", "--config", str(config_file), "--service-account", "other-sa") == 0
    assert _run_bodies(kfp_api)[-1]["service_account"] == "other-sa", "the flag beats the config"
    assert run["display_name"] == "try 1"
    (experiment,) = kfp_api.experiments.values()
    assert experiment["display_name"] == "nightly" and run["experiment_id"] == experiment["experiment_id"]
    assert experiment["namespace"] == "kfp-mlops"
    sent = json.dumps(run).lower()
    assert "secret" not in sent and "aws_" not in sent, "credentials must never travel as run parameters"


@pytest.mark.parametrize(
    "states, exit_code, last_line",
    [
        (["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"], 0, "released: deploy succeeded"),
        (["PENDING", "RUNNING", "FAILED"], 1, "task finetune: FAILED exit status 1"),
        (["RUNNING", "CANCELING", "CANCELED"], 1, "CANCELED"),
    ],
)
def test_submit_wait_streams_states_and_exits_with_the_final_state(kfp_api, capsys, states, exit_code, last_line):
    kfp_api.run_states = states
    assert _cli(kfp_api, "submit", "--wait", "--poll-s", "0.01") == exit_code
    out = capsys.readouterr().out
    seen = [s for line in out.splitlines() if ": " in line and "  run " in line for s in [line.rsplit(": ", 1)[1]]]
    expected = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert seen == expected, out
    assert last_line in out
    assert out.strip().endswith(f"(exit code {exit_code})")


def test_submit_wait_exits_3_when_a_gate_kept_the_model_from_deploy(kfp_api, capsys, monkeypatch):
    """KFP reports SUCCEEDED when a gate's condition skipped deploy: that is a blocked release, not a release."""
    monkeypatch.delenv("KFP_MLOPS_LEDGER", raising=False)
    kfp_api.run_states = ["RUNNING", "SUCCEEDED"]
    kfp_api.succeeded_tasks.update(robustness="SUCCEEDED", deploy="SKIPPED", monitor="SKIPPED")
    assert _cli(kfp_api, "submit", "--wait", "--poll-s", "0.01") == runs.BLOCKED_EXIT_CODE == 3
    out = capsys.readouterr().out
    assert "NOT released: deploy skipped because a gate returned false" in out
    assert "evaluate SUCCEEDED, privacy SUCCEEDED, robustness SUCCEEDED" in out
    del kfp_api.succeeded_tasks["deploy"]  # a backend that leaves untaken branches out of the task list
    assert _cli(kfp_api, "submit", "--wait", "--poll-s", "0.01") == 3
    out = capsys.readouterr().out
    assert "deploy did not run" in out
    assert "set serving.ledger_uri or KFP_MLOPS_LEDGER to the cluster's release ledger" in out  # none set here


def test_submit_wait_on_a_blocked_run_prints_the_failing_numbers_from_the_release_ledger(kfp_api, capsys, tmp_path,
                                                                                          monkeypatch):
    from components.core.ledger import Ledger
    from components.record.record import gate_verdict

    ledger = Ledger(tmp_path / "ledger")
    monkeypatch.setenv("KFP_MLOPS_LEDGER", str(tmp_path / "ledger"))
    real_wait = runs.wait_for_run

    def record_step_runs_during_the_run(client, conn, run_id, **kwargs):
        # What the run's record step appends (record_run): an unrelated run's records, then this run's.
        for kfp_run_id, auc in (("another-run", 0.99), (run_id, 0.853)):
            trained = ledger.append("trained", {"run_id": f"name-{kfp_run_id}", "kfp_run_id": kfp_run_id,
                                                "model_version": kfp_run_id, "config": {}, "config_sha256": ""})
            gates = {"evaluate": gate_verdict(True, {"reason": "accuracy 0.989 >= min 0.950"}),
                     "privacy": gate_verdict(False, {"reason": f"membership-inference AUC {auc} > max 0.650",
                                                     "remedy": "try finetune.dp_epsilon (DP-SGD)",
                                                     "blocked_by_max_mia_auc": True, "mia_auc": auc}),
                     "robustness": gate_verdict(True, {"reason": "all limits held"})}
            ledger.append("gated", {"run_id": f"name-{kfp_run_id}", "model_version": kfp_run_id, "gates": gates,
                                    "passed": False, "blocked_by": ["privacy"]}, parents=[trained])
        return real_wait(client, conn, run_id, **kwargs)

    monkeypatch.setattr(runs, "wait_for_run", record_step_runs_during_the_run)
    kfp_api.run_states = ["RUNNING", "SUCCEEDED"]
    kfp_api.succeeded_tasks.update(deploy="SKIPPED", monitor="SKIPPED")
    assert _cli(kfp_api, "submit", "--wait", "--poll-s", "0.01") == 3
    out = capsys.readouterr().out
    blocked = [line.strip() for line in out.splitlines() if "BLOCKED" in line]
    assert blocked == ["privacy BLOCKED: membership-inference AUC 0.853 > max 0.650 (try finetune.dp_epsilon (DP-SGD))"]
    assert "evaluate" not in " ".join(blocked) and "0.99" not in out

    monkeypatch.setenv("KFP_MLOPS_LEDGER", str(tmp_path / "elsewhere"))  # a ledger without this run
    assert _cli(kfp_api, "submit", "--wait", "--poll-s", "0.01") == 3
    assert "has no gated record of run" in capsys.readouterr().out


def test_wait_gives_up_at_the_timeout_and_says_the_run_goes_on(kfp_api, capsys):
    kfp_api.run_states = ["PENDING", "RUNNING"]  # never ends
    started = time.monotonic()
    assert _cli(kfp_api, "submit", "--wait", "--timeout", "0.3", "--poll-s", "0.05") == runs.TIMEOUT_EXIT_CODE
    assert time.monotonic() - started < 10
    assert "still RUNNING after 0.3s; it keeps running on the cluster" in capsys.readouterr().out


def test_start_cluster_run_records_the_reason(kfp_api):
    reason = "drift: 5 of 6 features drifted in 2026-01-01T00:00Z..2026-01-02T00:00Z"
    run_id = runs.start_cluster_run(Config(), kfp_api.url, reason, token=TOKEN, out=lambda line: None)
    (run,) = _run_bodies(kfp_api)
    assert run_id in kfp_api.runs
    assert reason in run["description"]
    assert "retrain" in run["display_name"]
    with pytest.raises(ValueError, match="needs a reason"):
        runs.start_cluster_run(Config(), kfp_api.url, "  ", token=TOKEN)


# --- schedule -------------------------------------------------------------------------

def test_schedule_is_a_recurring_run_with_converted_cron_no_catchup_and_max_concurrency(kfp_api, capsys):
    assert _cli(kfp_api, "schedule", "--cron", "0 3 * * *", "--name", "nightly", "--max-concurrency", "2",
                "--experiment", "retraining") == 0
    (request,) = kfp_api.calls("POST", "/recurringruns")
    body = request.body
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert body["no_catchup"] is True
    assert int(body["max_concurrency"]) == 2
    assert body["mode"] == "ENABLE"
    assert body["service_account"] == "kfp-mlops-pipeline"
    assert body["runtime_config"]["parameters"] == run_parameters(config_defaults(CLUSTER))
    assert "other_settings" not in body["runtime_config"]["parameters"], "the defaults: the compiled values apply"
    assert kfp_api.experiments[body["experiment_id"]]["display_name"] == "retraining"
    assert body["pipeline_version_reference"]["pipeline_version_id"] in kfp_api.versions
    assert "converted the 5-field cron '0 3 * * *' to KFP's 6-field form '0 0 3 * * *'" in capsys.readouterr().out


def test_schedule_list_pause_resume_delete_hit_the_right_endpoints(kfp_api, capsys):
    assert _cli(kfp_api, "schedule", "--cron", "0 0 4 * * SUN", "--name", "weekly") == 0
    (rrid,) = kfp_api.recurring_runs
    capsys.readouterr()

    assert _cli(kfp_api, "schedule", "list") == 0
    listing = capsys.readouterr().out
    assert "weekly" in listing and "enabled" in listing and "0 0 4 * * SUN" in listing and rrid in listing

    assert _cli(kfp_api, "schedule", "pause", "weekly") == 0  # by name
    assert [r.path for r in kfp_api.calls("POST", r"/recurringruns/.*:disable")] == [
        f"/apis/v2beta1/recurringruns/{rrid}:disable"]
    assert kfp_api.recurring_runs[rrid]["mode"] == "DISABLE"
    assert _cli(kfp_api, "schedule", "list") == 0
    assert "paused" in capsys.readouterr().out

    assert _cli(kfp_api, "schedule", "resume", rrid) == 0  # by id
    assert len(kfp_api.calls("POST", rf"/recurringruns/{rrid}:enable")) == 1
    assert kfp_api.recurring_runs[rrid]["mode"] == "ENABLE"

    assert _cli(kfp_api, "schedule", "delete", "weekly") == 0
    assert len(kfp_api.calls("DELETE", rf"/recurringruns/{rrid}")) == 1
    assert _cli(kfp_api, "schedule", "list") == 0
    assert "no schedules" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["schedule", "pause", "nope"], "no schedule named 'nope'"),
        (["schedule", "--cron", "0 3 * * *", "--name", "dup"], "a schedule named 'dup' already exists"),
        (["schedule", "--cron", "0 3 * * *", "--max-concurrency", "11"], "--max-concurrency must be 1-10"),
        (["schedule", "--cron", "0 3 * *"], "has 4 fields"),
        (["schedule"], "needs --cron"),
        (["schedule", "delete"], "needs the schedule's NAME or ID"),
    ],
)
def test_schedule_mistakes_give_clear_errors(kfp_api, capsys, args, message):
    if "dup" in args:
        assert _cli(kfp_api, "schedule", "--cron", "0 5 * * *", "--name", "dup") == 0
    assert _cli(kfp_api, *args) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("0 3 * * *", "0 0 3 * * *"),
        ("*/15 * * * *", "0 */15 * * * *"),
        ("30 2 1,15 * MON-FRI", "0 30 2 1,15 * MON-FRI"),
        ("0  3 *  * *", "0 0 3 * * *"),
        ("0 0 3 * * *", "0 0 3 * * *"),
        ("0 0 3 ? * 1-5", "0 0 3 ? * 1-5"),
        ("@daily", "@daily"),
    ],
)
def test_cron_is_converted_to_kfp_six_fields(expression, expected):
    converted, note = schedules.kfp_cron(expression)
    assert converted == expected
    assert (note is not None) == (len(expression.split()) == 5)
    robfig_parse(converted)  # and KFP's parser (as the fake implements it) accepts it


@pytest.mark.parametrize(
    "expression, message",
    [
        ("0 3 * *", "has 4 fields"),
        ("0 0 3 * * * *", "has 7 fields"),
        ("61 * * * *", "minute 61 is outside 0-59"),
        ("0 24 * * *", "hour 24 is outside 0-23"),
        ("0 3 0 * *", "day of month 0 is outside 1-31"),
        ("0 3 * 13 *", "month 13 is outside 1-12"),
        ("0 3 * * 7", "(Sunday is 0)"),
        ("0 3 L * *", "has 'L', not a number"),
        ("*/0 * * * *", "step '0' must be a positive number"),
        ("0 3-1 * * *", "runs backwards"),
        ("? 3 * * *", "'?' is only allowed for day of month and day of week"),
        ("@every 1h", "unknown descriptor"),
        ("", "has 0 fields"),
    ],
)
def test_bad_cron_is_rejected_with_a_clear_message(expression, message):
    with pytest.raises(ValueError) as err:
        schedules.kfp_cron(expression)
    assert message in str(err.value)


# --- auth, hosts, namespaces ------------------------------------------------------------

@pytest.mark.parametrize("token_args", [["--token", "stale-token"], []], ids=["wrong-token", "no-token"])
def test_rejected_token_gives_a_clear_error_fast(kfp_api, capsys, token_args):
    started = time.monotonic()
    assert main(["submit", "--host", kfp_api.url, *token_args]) == 1
    assert time.monotonic() - started < 10, "no silent retry loop on 401"
    err = capsys.readouterr().err
    assert "rejected the credentials" in err and "401 Unauthorized" in err and "KFP_TOKEN" in err
    assert not kfp_api.calls("POST", "/pipelines/upload"), "nothing may be uploaded without auth"


def test_token_from_env_and_from_a_token_file(kfp_api, monkeypatch, tmp_path):
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    assert main(["schedule", "list", "--host", kfp_api.url]) == 0
    monkeypatch.delenv("KFP_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    assert main(["schedule", "list", "--host", kfp_api.url]) == 0
    assert {r.authorization for r in kfp_api.requests} == {f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_gives_a_clear_error(capsys):
    started = time.monotonic()
    assert main(["submit", "--host", f"http://127.0.0.1:{_free_port()}", "--token", TOKEN]) == 1
    assert time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:" in err and "port-forward" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["submit"], "no Kubeflow Pipelines host: pass --kfp-host URL"),
        (["submit", "--host", "localhost:8888"], "must be an http:// or https:// URL"),
        (["schedule", "list"], "no Kubeflow Pipelines host"),
    ],
)
def test_host_mistakes_give_clear_errors(capsys, argv, message):
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_in_cluster_defaults(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("t")
    conn = connection.resolve_connection(Config().cluster, environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1",
                                                                    "KF_PIPELINES_SA_TOKEN_PATH": str(token_file)})
    assert conn.host == connection.IN_CLUSTER_HOST == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
    assert conn.token_file == str(token_file) and conn.token is None
    with pytest.raises(connection.ClusterError, match="that file does not exist"):
        connection.resolve_connection(Config().cluster, host="http://x:1",
                                      environ={"KF_PIPELINES_SA_TOKEN_PATH": str(tmp_path / "nope")})


def test_kubeconfig_route_goes_through_the_api_server_proxy(kfp_api, monkeypatch, tmp_path):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "c", "cluster": {"server": kfp_api.url}}],
        "users": [{"name": "u", "user": {"token": TOKEN}}],
        "contexts": [{"name": "lab", "context": {"cluster": "c", "user": "u"}},
                     {"name": "other", "context": {"cluster": "c", "user": "nobody"}}],
    }))
    # the kubernetes client reads $KUBECONFIG once, at import; patch what it read
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    assert main(["schedule", "list", "--kube-context", "lab"]) == 0
    assert kfp_api.requests and all(r.via_proxy for r in kfp_api.requests)
    assert main(["schedule", "list", "--kube-context", "missing"]) == 1


def test_multi_user_needs_a_namespace_single_user_drops_it(capsys):
    multi = FakeKfpApi(token=TOKEN, multi_user=True).start()
    single = FakeKfpApi(token=TOKEN, multi_user=False).start()
    try:
        assert main(["schedule", "list", "--host", multi.url, "--token", TOKEN, "--namespace", ""]) == 1
        assert "is multi-user: pass --namespace" in capsys.readouterr().err
        # single-user KFP rejects a namespace on some calls; the client leaves it out there
        assert main(["schedule", "--cron", "0 3 * * *", "--host", single.url, "--token", TOKEN]) == 0
        assert main(["schedule", "list", "--host", single.url, "--token", TOKEN]) == 0
        assert all("namespace" not in r.query for r in single.calls("GET", "/recurringruns"))
        assert not single.errors and not multi.errors
    finally:
        multi.stop()
        single.stop()


# --- the fake itself is strict (else the tests above could not fail) ---------------------

def _post(url, path, body, token=TOKEN):
    request = urllib.request.Request(url + "/apis/v2beta1" + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def fake_with_version():
    """A pipeline version and an experiment on the fake, uploaded by the real client."""
    server = FakeKfpApi(token=TOKEN).start()
    conn = connection.resolve_connection(Config().cluster, host=server.url, token=TOKEN, environ={})
    client = connection.connect(conn)
    pipeline_id, version_id, *_ = runs.compile_and_upload(Config(), client, conn, "kfp-mlops", out=lambda line: None)
    experiment_id = runs.ensure_experiment(client, conn, "e")
    yield server, {"display_name": "r", "experiment_id": experiment_id,
                   "pipeline_version_reference": {"pipeline_id": pipeline_id, "pipeline_version_id": version_id},
                   "runtime_config": {"parameters": {"pretrain_epochs": 2}}}
    server.stop()
    assert not server.errors, server.errors


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": "red"}, "unknown field 'colour' for V2beta1Run"),
        ({"service_account": 5}, "run.service_account: expected str"),
        ({"run_id": "mine"}, "output-only field(s) ['run_id']"),
        ({"state": "DONE"}, "'DONE' is not one of"),
        ({"runtime_config": {"parameters": {"pretrain_epochs": "two"}}}, "must be NUMBER_INTEGER"),
        ({"runtime_config": {"parameters": {"pretrain_epochs": True}}}, "must be NUMBER_INTEGER"),
        ({"runtime_config": {"parameters": {"aws_secret": "x"}}}, "are not inputs of the pipeline"),
        ({"experiment_id": ""}, "experiment_id is empty"),
        ({"pipeline_version_reference": {"pipeline_id": "p"}}, "pipeline 'p' not found"),
        ({"pipeline_spec": {"x": 1}}, "set either pipeline_spec or pipeline_version_reference"),
        ({"display_name": ""}, "display_name is empty"),
    ],
)
def test_fake_rejects_what_the_api_would(fake_with_version, change, message):
    server, body = fake_with_version
    status, answer = _post(server.url, "/runs", {**body, **change})
    assert status == 400 and message in answer["message"], answer
    assert _post(server.url, "/runs", body)[0] == 200  # the unchanged body is fine
    assert _post(server.url, "/runs", body, token="bad")[0] == 401


def test_fake_rejects_a_package_kfp_cannot_load(kfp_api, tmp_path):
    from kfp_server_api.exceptions import ApiException

    conn = connection.resolve_connection(Config().cluster, host=kfp_api.url, token=TOKEN)
    client = connection.connect(conn)
    bad = tmp_path / "pipeline.yaml"
    bad.write_text("pipelineInfo:\n  name: x\nroot: {}\nbogusField: 1\n")
    with pytest.raises(ApiException) as err:
        client.upload_pipeline(str(bad), pipeline_name="x")
    assert err.value.status == 400 and "Invalid pipeline spec" in err.value.body
