"""The local server: tokens, stopping only what is this home's, and (slow) a real TorchServe behind its auth proxy.

The integration tests start the real TorchServe behind its auth proxy once for the module, on
free ports, with a classifier trained here for a few seconds on sklearn digits; the crash tests
near the end restart it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import train_digits_classifier
from PIL import Image
from test_serving_handler import PIXEL_BOMBS

from components.core.features import EMBEDDING_COLUMNS, FEATURE_COLUMNS
from serving.archive import build_mar
from serving.client import encode_png, predict, read_token
from serving.processes import free_port, pid_alive, port_in_use
from serving.server import LocalTorchServe, _is_auth_proxy, _is_torchserve


def _log_lines(directory: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("requests-*.jsonl")) for line in f.read_text().splitlines()]


def test_token_files_are_private_random_and_kept(tmp_path):
    from serving.server import ensure_token_file

    path = ensure_token_file(tmp_path / "token")
    token = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600 and re.fullmatch(r"[A-Za-z0-9_-]{43}\n", token)
    path.chmod(0o644)
    assert ensure_token_file(path).read_text() == token and path.stat().st_mode & 0o777 == 0o600
    assert ensure_token_file(tmp_path / "other").read_text() != token
    path.write_text("\n")  # a token file left empty holds no token anyone could use: a new one
    assert len(ensure_token_file(path).read_text().strip()) == 43
    assert not list(tmp_path.glob(".*.tmp"))


def test_curl_example_reads_the_plain_token_file():
    from serving.server import curl_example

    line = curl_example({"token_file": "/srv/my home/token", "endpoint": "http://127.0.0.1:8080/predictions/digits"})
    assert line == ('curl -H "Authorization: Bearer $(cat \'/srv/my home/token\')" -H "Content-Type: image/png" '
                    "--data-binary @digit.png http://127.0.0.1:8080/predictions/digits")


def _decoy(*args: str) -> subprocess.Popen:
    """A process whose command line looks like an auth proxy's (a recycled pid, or another home's proxy)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-m", "serving.auth_proxy", *args])


def test_stop_kills_this_homes_proxy_and_never_a_stranger(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    ours = _decoy("--listen", "127.0.0.1:1", "--key-file", str(home / "key_file.json"))
    strangers = [_decoy("--key-file", str(tmp_path / "elsewhere" / "key_file.json")), subprocess.Popen(["sleep", "120"])]
    try:
        for stranger in strangers:
            (home / "state.json").write_text(json.dumps({"pid": stranger.pid, "proxy_pid": stranger.pid}))
            assert LocalTorchServe(home).status()["running"] is False
            assert LocalTorchServe(home).stop(quiet=True) == {"stopped": False, "home": str(home)}
            assert stranger.poll() is None, "a process that is not this home's was signalled"
        (home / "state.json").write_text(json.dumps({"pid": strangers[1].pid, "proxy_pid": ours.pid}))
        status = LocalTorchServe(home).status()
        assert status["running"] and status["proxy_running"] and not status["torchserve_running"]
        assert "TorchServe is not running" in status["problem"]
        assert LocalTorchServe(home).stop(quiet=True) == {"stopped": True, "pid": None, "proxy_pid": ours.pid,
                                                          "home": str(home)}
        assert ours.wait(10) == -signal.SIGTERM
        assert strangers[1].poll() is None
        assert json.loads((home / "state.json").read_text())["proxy_pid"] is None
    finally:
        for process in (ours, *strangers):
            process.kill()
            process.wait()


def test_stop_without_a_server_is_a_noop(tmp_path, capsys):
    assert LocalTorchServe(tmp_path).stop() == {"stopped": False, "home": str(tmp_path.resolve())}
    assert "nothing to stop" in capsys.readouterr().out
    assert LocalTorchServe(tmp_path).status()["running"] is False


def test_start_refuses_a_taken_port(tmp_path):
    mar = tmp_path / "digits.mar"
    mar.write_bytes(b"not used")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"inference port {port} already in use"):
            LocalTorchServe(tmp_path / "home").start(mar, "digits", inference_port=port, management_port=free_port(),
                                                     metrics_port=free_port(), timeout_s=5)
    assert not (tmp_path / "home" / "state.json").exists()


# ---------------------------------------------------------------- the real TorchServe

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One real TorchServe behind its auth proxy for the module, on free ports, serving a classifier trained just now.

    ``token`` is the clients' token (the proxy's), ``source_token`` the pipeline's, ``keys`` TorchServe's own
    key_file.json. Tests that restart the server call ``_restart``, which refreshes these.
    """
    root = tmp_path_factory.mktemp("served")
    test_x, test_y = train_digits_classifier(root / "model")
    (root / "model" / "reference_model.csv").write_text("feature\n0.5\n")  # what finetune leaves next to the weights
    mar = build_mar(root / "model", root / "export", "digits", "test-1", batch_size=4, max_batch_delay_ms=5)
    server = LocalTorchServe(root / "home")
    start_args = dict(mar_path=mar, model_name="digits", request_log_dir=root / "requests", timeout_s=120,
                      model_version="test-1", request_log_max_bytes=2048, model_dir=root / "model",
                      dataset_dir=root / "dataset", inference_port=free_port(), management_port=free_port(),
                      metrics_port=free_port())
    served = {"server": server, "test_x": test_x, "test_y": test_y, "root": root, "start_args": start_args}
    try:
        _started(served, server.start(**start_args))
        yield served
    finally:
        server.stop(quiet=True)
        assert not server.status()["running"], "TorchServe or its proxy left running after the tests"


def _started(served: dict, record: dict) -> None:
    served.update(record=record, keys=json.loads(Path(record["key_file"]).read_text()),
                  token=read_token(record["token_file"]), source_token=read_token(record["source_token_file"]))


def _post(served, body: bytes | str, content_type: str = "image/png", path: str = "predictions", **headers):
    base = served["record"]["endpoint"].rsplit("/predictions", 1)[0]
    return requests.post(f"{base}/{path}/digits", data=body, timeout=30,
                         headers={"Authorization": f"Bearer {served['token']}", "Content-Type": content_type, **headers})


def _describe(served, model: str = "digits") -> dict:  # TorchServe's management API, on loopback, with its own key
    url = f"{served['record']['management_endpoint']}/models/{model}"
    return requests.get(url, headers={"Authorization": f"Bearer {served['keys']['management']['key']}"}, timeout=10).json()[0]


@pytest.mark.slow
def test_served_model_predicts_digits(served):
    answers = [predict(served["record"]["endpoint"], encode_png(x), served["token"]) for x in served["test_x"][:20]]
    predicted = np.array([a["class_index"] for a in answers])
    assert (predicted == served["test_y"][:20]).mean() >= 0.8
    assert answers[0]["class_index"] == served["test_y"][0] and answers[0]["model_version"] == "test-1"
    assert len(answers[0]["top_k"]) == 3


@pytest.mark.slow
def test_served_json_topk_and_explanations(served):
    x = served["test_x"][3]
    by_pixels = _post(served, json.dumps({"pixels": x[0].tolist(), "topk": 5}), "application/json")
    by_base64 = _post(served, json.dumps({"image": base64.b64encode(encode_png(x)).decode()}), "application/json",
                      **{"X-Top-K": "2"})
    assert by_pixels.status_code == by_base64.status_code == 200, (by_pixels.text, by_base64.text)
    assert len(by_pixels.json()["top_k"]) == 5 and len(by_base64.json()["top_k"]) == 2
    assert by_pixels.json()["class_index"] == by_base64.json()["class_index"] == served["test_y"][3]
    explained = _post(served, encode_png(x), path="explanations", **{"X-Target": "1"})
    assert explained.status_code == 200, explained.text
    answer = explained.json()
    assert answer["target_index"] == 1 and np.array(answer["saliency"]).shape == (8, 8)
    assert answer["class_index"] == served["test_y"][3]


@pytest.mark.slow
def test_served_batching_and_workers_come_from_the_archive(served):
    model = _describe(served)
    assert (model["batchSize"], model["maxBatchDelay"], model["minWorkers"], model["maxWorkers"]) == (4, 5, 1, 1)
    # Concurrent requests are answered in batches, each with its own answer.
    from concurrent.futures import ThreadPoolExecutor

    images = served["test_x"][:16]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda im: predict(served["record"]["endpoint"], encode_png(im), served["token"]), images))
    assert [a["class_index"] for a in answers] == [predict(served["record"]["endpoint"], encode_png(im), served["token"])["class_index"]
                                                   for im in images]
    # The batches reached the worker through the handler's buffered reader (serving/handler.py, read_exactly).
    assert "reads the frontend's messages through a 64 KiB buffer" in (served["server"].logs / "model_log.log").read_text()


@pytest.mark.slow
def test_a_lone_request_is_answered_by_the_unbatched_twin_and_logged_once(served):
    """The same model registered with batches of one answers what comes alone (serving/unbatched_route.py)."""
    record, access_log = served["record"], served["server"].logs / "access_log.log"
    assert record["unbatched_model"] == "digits-unbatched"
    twin = _describe(served, "digits-unbatched")
    assert (twin["batchSize"], twin["minWorkers"], twin["maxWorkers"]) == (1, 1, 1)
    assert [w["status"] for w in twin["workers"]] == ["READY"]
    log_dir, png = Path(record["request_log_dir"]), encode_png(served["test_x"][6])
    by_twin_before = access_log.read_text().count('"POST /predictions/digits-unbatched ')
    answers = [predict(record["endpoint"], png, served["source_token"], source="lone-requests") for _ in range(5)]
    assert all(a == answers[0] for a in answers) and answers[0]["model_version"] == "test-1"
    assert answers[0]["class_index"] == served["test_y"][6]
    deadline = time.monotonic() + 15  # the request log's background thread and TorchServe's asynchronous access log
    while time.monotonic() < deadline and (
            sum(line["source"] == "lone-requests" for line in _log_lines(log_dir)) < 5
            or access_log.read_text().count('"POST /predictions/digits-unbatched ') < by_twin_before + 5):
        time.sleep(0.2)
    time.sleep(0.5)  # a line logged twice would be written by now
    logged = [line for line in _log_lines(log_dir) if line["source"] == "lone-requests"]
    assert len(logged) == 5 and {line["model_version"] for line in logged} == {"test-1"}
    assert access_log.read_text().count('"POST /predictions/digits-unbatched ') == by_twin_before + 5


@pytest.mark.slow
def test_deployment_record_and_status(served):
    record, server, root = served["record"], served["server"], served["root"]
    expected_keys = {"endpoint", "management_endpoint", "metrics_endpoint", "token_file", "source_token_file",
                     "request_log_dir", "model_name", "model_version", "model_dir", "dataset_dir", "model_reference",
                     "home", "pid", "proxy_pid", "key_file", "torchserve_endpoint", "max_request_bytes",
                     "unbatched_model"}
    assert expected_keys <= set(record)
    assert json.loads((Path(record["home"]) / "state.json").read_text()) == record
    assert record["endpoint"].startswith("http://127.0.0.1:") and record["endpoint"].endswith("/predictions/digits")
    assert record["endpoint"] != record["torchserve_endpoint"], "clients get the proxy, not TorchServe"
    assert (record["model_dir"], record["dataset_dir"]) == (str(root / "model"), str(root / "dataset"))
    assert record["model_reference"] == str(root / "model" / "reference_model.csv")
    home = Path(record["home"])
    assert (record["token_file"], record["source_token_file"], record["key_file"]) == \
        (str(home / "token"), str(home / "source-token"), str(home / "key_file.json"))
    for path in (record["token_file"], record["source_token_file"], record["key_file"]):
        assert Path(path).stat().st_mode & 0o777 == 0o600, path
    token, source_token = served["token"], served["source_token"]
    assert Path(record["token_file"]).read_text() == token + "\n" and len(token) >= 32
    assert len({token, source_token, served["keys"]["inference"]["key"]}) == 3
    status = server.status()
    assert status["running"] and status["healthy"] and status["problem"] is None
    assert (status["pid"], status["proxy_pid"], status["endpoint"]) == (record["pid"], record["proxy_pid"], record["endpoint"])
    assert (status["token_file"], status["model_dir"]) == (record["token_file"], record["model_dir"])


@pytest.mark.slow
def test_the_curl_example_works_as_printed(served, tmp_path):
    """The line 'mlops serve status' prints, run by a shell in a directory holding digit.png."""
    from serving.server import curl_example

    (tmp_path / "digit.png").write_bytes(encode_png(served["test_x"][2]))
    line = curl_example(served["record"])
    assert "key_file.json" not in line
    done = subprocess.run(["bash", "-c", line + " --silent --show-error"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["class_index"] == served["test_y"][2]


@pytest.mark.slow
def test_mlops_serve_status_says_where_and_how(served, capsys):
    from pipelines.cli import main

    home = served["record"]["home"]
    assert main(["serve", "status", "--serving-home", home]) == 0
    out = capsys.readouterr().out
    assert "healthy, 1 worker(s) ready" in out and served["record"]["endpoint"] in out
    assert served["record"]["token_file"] in out and "curl -H" in out
    assert main(["serve", "status", "--json", "--serving-home", home]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["running"] and status["healthy"] and status["workers_ready"] == 1 and status["problem"] is None


def test_mlops_serve_without_a_server_or_a_run(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["serve", "status", "--serving-home", str(tmp_path / "home")]) == 1
    assert "No TorchServe is running" in capsys.readouterr().out
    assert main(["serve", "stop", "--serving-home", str(tmp_path / "home")]) == 0
    assert main(["serve", "start", "--serving-home", str(tmp_path / "home"), "--runs-dir", str(tmp_path / "runs")]) == 1
    assert "run 'mlops run' first" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Bearer ", "Basic abc", "torchserve-key"],
                         ids=["no-token", "wrong-token", "empty-token", "basic", "torchserve-key"])
def test_prediction_without_the_right_token_is_refused_by_the_proxy(served, auth):
    """401 from the auth proxy, before the body is read; TorchServe's own key is no client token."""
    record = served["record"]
    if auth == "torchserve-key":
        auth = f"Bearer {served['keys']['inference']['key']}"
    headers = {"Content-Type": "image/png", **({"Authorization": auth} if auth else {})}
    for path in ("predictions", "explanations"):
        url = record["endpoint"].replace("/predictions/", f"/{path}/")
        response = requests.post(url, data=encode_png(served["test_x"][0]), headers=headers, timeout=10)
        assert response.status_code == 401, response.text
        assert "token" in response.json()["message"].lower() and "Token Authorization failed" not in response.text
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.slow
def test_torchserve_itself_still_wants_its_key(served):
    """Behind the proxy TorchServe keeps token authorization on: its loopback port refuses the clients' token."""
    record = served["record"]
    response = requests.post(record["torchserve_endpoint"], data=encode_png(served["test_x"][0]), timeout=10,
                             headers={"Authorization": f"Bearer {served['token']}", "Content-Type": "image/png"})
    assert 400 <= response.status_code < 500 and "Token Authorization failed" in response.text
    direct = requests.post(record["torchserve_endpoint"], data=encode_png(served["test_x"][0]), timeout=10,
                           headers={"Authorization": f"Bearer {served['keys']['inference']['key']}",
                                    "Content-Type": "image/png"})
    assert direct.status_code == 200 and direct.json()["class_index"] == served["test_y"][0]


@pytest.mark.slow
def test_other_apis_need_their_own_key(served):
    """The inference key opens neither the management API nor the token API."""
    record, token = served["record"], served["keys"]["inference"]["key"]
    for url in (f"{record['management_endpoint']}/models", f"{record['management_endpoint']}/models/digits"):
        response = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert response.status_code >= 400 and "Token Authorization failed" in response.text


@pytest.mark.slow
def test_model_and_workflow_registration_is_refused(served):
    record, keys = served["record"], served["keys"]
    mgmt = record["management_endpoint"]
    # With the management key the model API itself says no; the token-API key is not a management key.
    for key, refusal in ((keys["management"]["key"], "not allowed"), (keys["API"]["key"], "Token Authorization failed")):
        response = requests.post(f"{mgmt}/models", params={"url": "digits.mar", "model_name": "intruder"},
                                 headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert 400 <= response.status_code < 500 and refusal in response.text, response.text
    management = {"Authorization": f"Bearer {keys['management']['key']}"}
    # (Scaling workers, PUT /models/digits?min_worker=N, stays possible for the holder of the management key:
    # TorchServe 0.12 has no switch for it. That key is in an owner-only file and the API is on loopback.)
    for method, path in (("DELETE", "/models/digits"), ("DELETE", "/models/digits/test-1"),
                         ("POST", "/workflows?url=digits.mar"), ("POST", "/models?url=file:///etc/passwd"),
                         ("POST", "/models?url=https://example.com/evil.mar")):
        response = requests.request(method, f"{mgmt}{path}", headers=management, timeout=10)
        assert 400 <= response.status_code < 500, (method, path, response.status_code, response.text)
    listing = requests.get(f"{mgmt}/models", headers=management, timeout=10).json()
    assert [m["modelName"] for m in listing["models"]] == ["digits", "digits-unbatched"]  # the twin: same archive
    assert len(_describe(served)["workers"]) == 1


@pytest.mark.slow
def test_every_api_listens_on_loopback_only(served):
    """Nothing TorchServe or the proxy opened is reachable from another host: each listening socket is on 127.0.0.1."""
    pids = [served["record"]["pid"], served["record"]["proxy_pid"], *[w["pid"] for w in _describe(served)["workers"]]]
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "0A":  # 0A = LISTEN
                listening.append(fields[1])
    ports = {int(addr.split(":")[1], 16) for addr in listening}
    record = served["record"]
    expected = {int(u.rsplit(":", 1)[1].split("/")[0]) for u in (record["endpoint"], record["management_endpoint"],
                                                                  record["metrics_endpoint"], record["torchserve_endpoint"])}
    assert expected <= ports, (expected, ports)
    loopback = ("0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F")
    assert listening and all(addr.split(":")[0] in loopback for addr in listening), listening


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, content_type, code, message",
    [
        (b"definitely not a png", "image/png", 400, "not a PNG or JPEG"),
        (b"", "image/png", 400, "empty request body"),
        (b"GIF89a", "image/gif", 415, "unsupported content type"),
        (b'{"pixels": [[0.5]]}', "application/json", 400, "this model takes [8, 8] or [1, 8, 8]"),
        (b'{"pixels": ', "application/json", 400, "not valid JSON"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * (11 * 2**20), "image/png", 413, "10485760"),  # the proxy's limit
    ],
    ids=["corrupt", "empty", "gif", "wrong-shape", "truncated-json", "oversize"],
)
def test_bad_requests_are_4xx_and_the_worker_survives(served, body, content_type, code, message):
    pid_before = [w["pid"] for w in _describe(served)["workers"]]
    response = _post(served, body, content_type)
    assert response.status_code == code, response.text[:300]
    assert message in response.json()["message"]
    answer = predict(served["record"]["endpoint"], encode_png(served["test_x"][1]), served["token"])
    assert answer["class_index"] == served["test_y"][1]
    assert [w["pid"] for w in _describe(served)["workers"]] == pid_before


def _noise_png(width: int, height: int) -> bytes:
    """Random RGB noise: incompressible, so a PNG of about 3 bytes per pixel."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@pytest.mark.slow
def test_an_oversized_image_gets_a_413_not_a_reset(served):
    """A 2000x2000 photo-like PNG (over 10 MiB): the proxy answers 413 with the limit, without reading it."""
    body = _noise_png(2000, 2000)
    limit = served["record"]["max_request_bytes"]
    assert len(body) > limit == 10 * 2**20
    with requests.Session() as session:  # a client that keeps its connection, and a fresh one per request
        for send in (session.post, requests.post, session.post, requests.post):
            response = send(served["record"]["endpoint"], data=body, timeout=30,
                            headers={"Authorization": f"Bearer {served['token']}", "Content-Type": "image/png"})
            assert response.status_code == 413, response.text[:300]
            message = response.json()["message"]
            assert str(limit) in message, message
        answer = session.post(served["record"]["endpoint"], data=encode_png(served["test_x"][1]), timeout=30,
                              headers={"Authorization": f"Bearer {served['token']}", "Content-Type": "image/png"})
    assert answer.status_code == 200 and answer.json()["class_index"] == served["test_y"][1]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PIXEL_BOMBS))
def test_a_small_file_with_too_many_pixels_gets_a_413_from_the_handler(served, name):
    pid_before = [w["pid"] for w in _describe(served)["workers"]]
    response = _post(served, PIXEL_BOMBS[name](), "image/jpeg" if name.startswith("jpeg") else "image/png")
    assert response.status_code == 413, response.text[:300]
    assert "the limit is 1048576 pixels" in response.json()["message"]
    answer = predict(served["record"]["endpoint"], encode_png(served["test_x"][1]), served["token"])
    assert answer["class_index"] == served["test_y"][1]
    assert [w["pid"] for w in _describe(served)["workers"]] == pid_before


@pytest.mark.slow
def test_only_the_source_token_may_tag_requests(served):
    """X-Request-Source (how the monitor tells its replay from clients) passes only with the pipeline's token."""
    record, png = served["record"], encode_png(served["test_x"][4])
    log_dir = Path(record["request_log_dir"])
    clients_before = sum(line["source"] == "client" for line in _log_lines(log_dir))
    for _ in range(3):  # first: the log is written in order, so these are in before the tagged ones below
        predict(record["endpoint"], png, served["token"], source="spoofed-by-client")
    for _ in range(3):
        predict(record["endpoint"], png, served["source_token"], source="tagged-by-pipeline")
    deadline = time.monotonic() + 15  # written by the worker's background thread
    while time.monotonic() < deadline and sum(line["source"] == "tagged-by-pipeline" for line in _log_lines(log_dir)) < 3:
        time.sleep(0.2)
    sources = [line["source"] for line in _log_lines(log_dir)]
    assert sources.count("tagged-by-pipeline") == 3
    assert "spoofed-by-client" not in sources and sources.count("client") >= clients_before + 3


@pytest.mark.slow
def test_metrics_endpoint_and_rotated_request_log(served):
    record = served["record"]
    for x in served["test_x"][:30]:
        predict(record["endpoint"], encode_png(x), served["source_token"], source="replay")
    metrics = requests.get(record["metrics_endpoint"], timeout=10)
    assert metrics.status_code == 200 and "ts_inference_requests_total" in metrics.text
    log_dir = Path(record["request_log_dir"])
    deadline = time.monotonic() + 15  # written by the worker's background thread
    while time.monotonic() < deadline and sum(line.get("source") == "replay" for line in _log_lines(log_dir)) < 30:
        time.sleep(0.2)
    lines = _log_lines(log_dir)
    assert sum(line["source"] == "replay" for line in lines) == 30
    assert all(set(FEATURE_COLUMNS + EMBEDDING_COLUMNS) <= set(line) for line in lines)
    assert lines[-1]["model_version"] == "test-1"
    # Rotated at 2 KiB, whole lines. Each worker (the batched model's and its unbatched twin's) writes files of its
    # own, so the file a worker is still writing may hold a single short line.
    files = {f.name: f.read_bytes() for f in log_dir.glob("requests-*.jsonl")}
    assert len(files) >= 3 and all(0 < len(data) <= 2048 and data.endswith(b"\n") for data in files.values()), \
        {name: len(data) for name, data in files.items()}
    assert sum(len(data) > 1024 for data in files.values()) >= 3, "files are rotated near the limit, not per line"


@pytest.mark.slow
def test_killed_worker_recovers_under_load(served):
    """SIGKILL the worker while requests are in flight: TorchServe starts a new one and later requests succeed."""
    record, png = served["record"], encode_png(served["test_x"][5])
    old_pid = _describe(served)["workers"][0]["pid"]
    expected = predict(record["endpoint"], png, served["token"])
    stop, codes = threading.Event(), []

    def load():
        session = requests.Session()
        while not stop.is_set():
            try:
                codes.append(session.post(record["endpoint"], data=png, timeout=30, headers={
                    "Authorization": f"Bearer {served['token']}", "Content-Type": "image/png"}).status_code)
            except requests.RequestException:
                codes.append(-1)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers = _describe(served)["workers"]
            if workers and workers[0]["pid"] != old_pid and workers[0]["status"] == "READY":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no new READY worker within 60 s: {_describe(served)['workers']}")
        served_before = len(codes)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert codes.count(200) > 0 and len(codes) > served_before
    assert all(c == 200 for c in codes[served_before + 8:]), codes[served_before:]  # after recovery: all fine
    answers = [predict(record["endpoint"], png, served["token"]) for _ in range(5)]
    assert all(a == expected for a in answers)  # the new worker loaded the same model


@pytest.mark.slow
def test_a_proxy_that_cannot_start_fails_the_start_clearly_and_leaves_nothing(served, tmp_path):
    """A client token file someone filled with a weak token: the proxy refuses it; start says why and cleans up."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "token").write_text("short\n")
    server = LocalTorchServe(home)
    ports = {"inference_port": free_port(), "management_port": free_port(), "metrics_port": free_port()}
    with pytest.raises(RuntimeError, match=r"(?s)the auth proxy \(pid \d+\) exited during startup.*shorter than"):
        server.start(served["start_args"]["mar_path"], "digits", timeout_s=60, **ports)
    state = json.loads((home / "state.json").read_text())
    assert state["pid"] is None and state["proxy_pid"] is None and not server.status()["running"]
    assert not any(port_in_use("127.0.0.1", p) for p in ports.values())


def _restart(served: dict) -> dict:
    _started(served, served["server"].start(**served["start_args"]))
    return served["record"]


def _wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_crashed_proxy_shows_in_status_and_start_replaces_the_rest(served, capsys):
    server, old = served["server"], served["record"]
    token, png = served["token"], encode_png(served["test_x"][6])
    os.kill(old["proxy_pid"], signal.SIGKILL)
    _wait_until(lambda: not _is_auth_proxy(old["proxy_pid"], server.home))
    status = server.status()
    assert status["running"] and status["torchserve_running"] and not status["proxy_running"]
    assert not status["healthy"] and "the auth proxy is not running" in status["problem"] and status["proxy_pid"] is None
    with pytest.raises(requests.ConnectionError):
        requests.get(old["endpoint"].rsplit("/predictions", 1)[0] + "/healthz", timeout=5)

    new = _restart(served)
    assert "crashed server" in capsys.readouterr().out
    assert not _is_torchserve(old["pid"]), "the surviving TorchServe was stopped before the new one started"
    assert new["endpoint"] == old["endpoint"] and new["proxy_pid"] != old["proxy_pid"] and server.status()["healthy"]
    assert served["token"] == token, "clients keep their token across restarts"
    assert predict(new["endpoint"], png, token)["class_index"] == served["test_y"][6]


@pytest.mark.slow
def test_a_crashed_torchserve_gets_an_http_answer_and_start_replaces_the_rest(served):
    server, old = served["server"], served["record"]
    token, png = served["token"], encode_png(served["test_x"][6])
    workers = [w["pid"] for w in _describe(served)["workers"]]
    os.kill(old["pid"], signal.SIGKILL)
    _wait_until(lambda: not _is_torchserve(old["pid"]))
    status = server.status()
    assert status["running"] and status["proxy_running"] and not status["torchserve_running"]
    assert not status["healthy"] and "TorchServe is not running" in status["problem"] and status["pid"] is None
    response = requests.post(old["endpoint"], data=png, timeout=30,
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"})
    assert response.status_code == 502 and response.json()["message"], response.text

    new = _restart(served)
    assert not _is_auth_proxy(old["proxy_pid"], server.home), "the surviving proxy was stopped"
    assert not any(pid_alive(w) for w in workers), "the crashed frontend's workers are gone"
    assert new["pid"] != old["pid"] and server.status()["healthy"]
    assert predict(new["endpoint"], png, token)["class_index"] == served["test_y"][6]


@pytest.mark.slow
def test_stop_really_stops(served):
    """Runs last in this module: stops the shared server and checks nothing is left."""
    record, server = served["record"], served["server"]
    workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == record["pid"]]
    assert workers, "expected at least one Python worker under the TorchServe frontend"
    stopped = server.stop()
    assert stopped == {"stopped": True, "pid": record["pid"], "proxy_pid": record["proxy_pid"], "home": record["home"]}
    status = server.status()
    assert not status["running"] and not status["torchserve_running"] and not status["proxy_running"]
    for pid in [record["pid"], record["proxy_pid"], *workers]:
        assert not pid_alive(pid)
    for url in (record["endpoint"], record["torchserve_endpoint"]):
        assert not port_in_use("127.0.0.1", int(url.split(":")[2].split("/")[0]))
    assert not Path(record["key_file"]).exists()
    assert Path(record["token_file"]).read_text() == served["token"] + "\n", "the clients' token outlives the server"
    with pytest.raises(requests.ConnectionError):
        requests.get(record["endpoint"].rsplit("/predictions", 1)[0] + "/ping", timeout=5)
    assert server.stop(quiet=True) == {"stopped": False, "home": record["home"]}


def _parent(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
