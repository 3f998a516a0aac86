"""The unbatched route (serving/unbatched_route.py): the proxy sends a lone prediction to the model's batch-1 twin.

Over real HTTP on loopback, in front of the stand-in TorchServe of the auth-proxy tests, which records the path
each request reached; and the twin's archive, built from a .mar as the local server does.
"""

import json
import threading
import time
import zipfile

import pytest
import requests
from test_serving_auth_proxy import TOKEN, FakeTorchServe, _auth, _serve, _write_keys

from serving.auth_proxy import AuthProxyServer, ProxyConfig, build_parser
from serving.unbatched_route import parse_route, unbatched_name, write_unbatched_archive

TWIN = unbatched_name("digits")


@pytest.fixture
def routed(tmp_path):
    """(proxy URL, upstream): a proxy routing lone predictions for 'digits' to its twin."""
    key_file, token_file = tmp_path / "key_file.json", tmp_path / "token"
    _write_keys(key_file, "pod-key-1")
    token_file.write_text(TOKEN + "\n")
    upstream = FakeTorchServe(key_file)
    _serve(upstream)
    proxy = AuthProxyServer(("127.0.0.1", 0), ProxyConfig(
        upstream=f"http://127.0.0.1:{upstream.server_port}", key_file=str(key_file), token_file=str(token_file),
        unbatched_models={"digits": TWIN}))
    _serve(proxy)
    yield f"http://127.0.0.1:{proxy.server_port}", upstream
    for server in (proxy, upstream):
        server.shutdown()
        server.server_close()


def _paths(upstream) -> list[str]:
    return [seen["path"] for seen in upstream.seen]


def test_a_lone_prediction_goes_to_the_twin_and_nothing_else_does(routed):
    url, upstream = routed
    with requests.Session() as session:
        for _ in range(3):
            answer = session.post(f"{url}/predictions/digits", data=b"png", headers=_auth(), timeout=5)
            assert answer.status_code == 200 and answer.json()["label"] == "7"
        session.post(f"{url}/predictions/other", data=b"png", headers=_auth(), timeout=5)
        session.post(f"{url}/predictions/digits/1.0", data=b"png", headers=_auth(), timeout=5)
        session.post(f"{url}/explanations/digits", data=b"png", headers=_auth(), timeout=5)
        session.get(f"{url}/ping", headers=_auth(), timeout=5)
    assert _paths(upstream) == [f"/predictions/{TWIN}"] * 3 + [
        "/predictions/other", "/predictions/digits/1.0", "/explanations/digits", "/ping"]
    assert all(seen["headers"]["Authorization"] == "Bearer pod-key-1" for seen in upstream.seen)


def test_a_prediction_that_finds_another_in_flight_goes_to_the_batched_model(routed):
    url, upstream = routed
    upstream.delay_s = 0.5
    first = threading.Thread(target=requests.post, args=(f"{url}/predictions/digits",),
                             kwargs={"data": b"a", "headers": _auth(), "timeout": 5})
    first.start()
    time.sleep(0.2)  # the first is in flight now
    second = requests.post(f"{url}/predictions/digits", data=b"bb", headers=_auth(), timeout=5)
    first.join(5)
    assert second.status_code == 200
    assert sorted((seen["body"], seen["path"]) for seen in upstream.seen) == [
        (b"a", f"/predictions/{TWIN}"), (b"bb", "/predictions/digits")]
    upstream.delay_s = 0.0
    requests.post(f"{url}/predictions/digits", data=b"c", headers=_auth(), timeout=5)
    assert upstream.seen[-1]["path"] == f"/predictions/{TWIN}", "the count of requests in flight went back to 0"


@pytest.mark.parametrize("status", [404, 503])
def test_a_twin_without_a_worker_hands_the_request_to_the_batched_model(routed, status):
    url, upstream = routed
    upstream.status_by_path[f"/predictions/{TWIN}"] = status
    answer = requests.post(f"{url}/predictions/digits", data=b"png", headers=_auth(), timeout=5)
    assert answer.status_code == 200 and answer.json()["path"] == "/predictions/digits"
    assert _paths(upstream) == [f"/predictions/{TWIN}", "/predictions/digits"]


@pytest.mark.parametrize("path", [f"/predictions/{TWIN}", f"/explanations/{TWIN}", f"/predictions/{TWIN}/1.0"])
def test_clients_cannot_call_the_twin_by_name(routed, path):
    url, upstream = routed
    answer = requests.post(url + path, data=b"png", headers=_auth(), timeout=5)
    assert answer.status_code == 404 and "is not served here" in answer.json()["message"]
    unauthenticated = requests.post(url + path, data=b"png", timeout=5)
    assert unauthenticated.status_code == 401, "the token is checked first"
    assert upstream.seen == []


def test_the_route_option_is_checked():
    assert parse_route("digits=digits-unbatched") == ("digits", "digits-unbatched")
    for bad in ("digits", "digits=", "=twin", "a b=twin", "digits=../x"):
        with pytest.raises(ValueError, match="MODEL=TWIN"):
            parse_route(bad)
    assert build_parser().parse_args(["--unbatched-model", "a=b"]).unbatched_model == ["a=b"]


def test_the_twin_archive_has_batches_of_one_and_everything_else_unchanged(tmp_path):
    mar = tmp_path / "digits.mar"
    config = "minWorkers: 2\nmaxWorkers: 2\nbatchSize: 32\nmaxBatchDelay: 1\nresponseTimeout: 60\n"
    manifest = {"model": {"modelName": "digits", "configFile": "model-config.yaml", "handler": "handler.py"}}
    with zipfile.ZipFile(mar, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        z.writestr("model-config.yaml", config)
        z.writestr("model.safetensors", b"\x00weights")
        z.writestr("handler.py", "print('handler')\n")
    twin = write_unbatched_archive(mar, tmp_path / f"{TWIN}.mar")
    with zipfile.ZipFile(twin) as z, zipfile.ZipFile(mar) as original:
        assert z.read("model-config.yaml").decode() == \
            "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 1\nmaxBatchDelay: 1\nresponseTimeout: 60\n"
        assert sorted(z.namelist()) == sorted(original.namelist())
        for name in ("MAR-INF/MANIFEST.json", "model.safetensors", "handler.py"):
            assert z.read(name) == original.read(name)
    assert not list(tmp_path.glob("*.tmp"))
    without_config = tmp_path / "plain.mar"
    with zipfile.ZipFile(without_config, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "digits"}}))
    with pytest.raises(ValueError, match="no model config"):
        write_unbatched_archive(without_config, tmp_path / "x.mar")
