"""Shadow and canary rollouts on this machine (components/deploy/rollout/local.py), with real TorchServes behind real
auth proxies: fault drills rolled back with the failing criterion named while the champion's answers stay the same
byte for byte, and sound challengers promoted without a refused request.

The faulty challengers are real models in real archives: the project's handler made to fail on a share of the
inputs or to sleep (``drill_handler.py``, configured by the model's metadata), and a model whose classes are
permuted. One champion serves for the whole module; each drill runs its challenger beside it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from conftest import DIGIT_NAMES, fit_small_classifier, settings_of
from sklearn.datasets import load_digits

from components.core.data import Splits, save_splits
from components.core.features import write_model_reference
from components.core.models import load_classifier, save_classifier
from components.deploy.checks import SmokeTest
from components.deploy.local import deploy_local
from components.deploy.rollout import local as rollout_local
from pipelines.config import RolloutConfig, ServingConfig
from serving.archive import build_mar
from serving.client import encode_png, read_token
from serving.processes import free_port
from serving.server import CHALLENGER_DIR, LocalTorchServe

pytestmark = pytest.mark.slow
DRILL_HANDLER = Path(__file__).with_name("drill_handler.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Models (a champion, a sound challenger, the drills'), a dataset, and the champion serving from a home."""
    root = tmp_path_factory.mktemp("rollout")
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = (digits.images[order][:, None] / 16.0).astype(np.float32)
    y = digits.target[order].astype(np.int64)
    train, val, test = slice(0, 1100), slice(1100, 1400), slice(1400, None)
    empty = np.zeros((0, 1, 8, 8), np.float32)
    save_splits(Splits(train_x=empty, train_y=np.zeros(0, np.int64), val_x=x[val], val_y=y[val], test_x=x[test],
                       test_y=y[test], pool_x=empty, class_names=DIGIT_NAMES), root / "dataset")

    def model(name: str, steps: int, seed_offset: int = 0, **metadata) -> Path:
        torch.manual_seed(seed_offset)
        net = fit_small_classifier(x[train][seed_offset:], y[train][seed_offset:], width=16, steps=steps)
        save_classifier(net, root / name, {"class_names": DIGIT_NAMES, "model_version": name, **metadata})
        write_model_reference(root / name, x[val])  # as finetune does: the validation split's confidences
        return root / name

    models = {"champion-1": model("champion-1", 600), "sound-2": model("sound-2", 800)}  # trained on: a little better
    net, metadata = load_classifier(models["champion-1"])
    for name, drill in (("errors-3", {"fail_share": 0.3}), ("slow-4", {"sleep_ms": 60})):
        save_classifier(net, root / name, {**metadata, "model_version": name, "drill": drill})
        write_model_reference(root / name, x[val])
        models[name] = root / name
    for name, swaps in (("swapped-5", [(3, 8), (1, 7)]), ("permuted-6", [(i, (i + 1) % 10) for i in range(10)])):
        permuted = load_classifier(models["champion-1"])[0]
        order_ = list(range(10))
        for a, b in swaps:
            order_[a] = b
        with torch.no_grad():  # class i now scores what class order_[i] scored: a real model, misnamed classes
            permuted.head.weight.copy_(net.head.weight[order_])
            permuted.head.bias.copy_(net.head.bias[order_])
        save_classifier(permuted, root / name, {**metadata, "model_version": name})
        write_model_reference(root / name, x[val])
        models[name] = root / name

    ports = {"inference_port": free_port(), "management_port": free_port(), "metrics_port": free_port()}
    serving = settings_of(serving=ServingConfig(home=str(root / "home"), startup_timeout_s=120, **ports)).serving
    record = deploy_local(models["champion-1"], root / "dataset", serving)  # the first release: replace
    assert record["strategy"] == "replace" and "rollout" not in record
    bodies = [encode_png(image) for image in x[test]]  # the traffic, and the answers compared byte for byte
    yield {"root": root, "models": models, "serving": serving, "dataset": root / "dataset", "bodies": bodies,
           "test_x": x[test]}
    LocalTorchServe(root / "home").stop()


def rollout(strategy: str, **changes):
    return settings_of(rollout=RolloutConfig(**{"strategy": strategy, "min_requests": 60, "share": 1.0,
                                                "replay": False, **changes})).rollout


def _answers(endpoint: str, token: str, bodies: list[bytes]) -> list[tuple[int, bytes]]:
    with requests.Session() as session:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
        return [(r.status_code, r.content) for r in (session.post(endpoint, data=b, headers=headers, timeout=30)
                                                     for b in bodies)]


def _evidence(endpoint: str, source_token: str) -> dict:
    base = endpoint.rsplit("/predictions/", 1)[0]
    return requests.get(f"{base}/rollout", headers={"Authorization": f"Bearer {source_token}"}, timeout=10).json()


def drill(world, monkeypatch, strategy: str, challenger: str, faulty_handler: bool = False, **changes) -> dict:
    """Run a rollout of ``challenger`` while a client sends the fixed images; check that the champion's answers
    never changed and nothing of the challenger is left; return the deployment record."""
    monkeypatch.setattr(rollout_local, "WARM_UP_S", 1.0)
    home, serving = Path(world["serving"].home), world["serving"]
    champion = LocalTorchServe(home)
    state = champion.status()
    endpoint, version = state["endpoint"], state["model_version"]
    client, source = read_token(state["token_file"]), read_token(state["source_token_file"])
    before = _answers(endpoint, client, world["bodies"])
    assert all(status == 200 for status, _ in before)

    model_dir = world["models"][challenger]
    mar = build_mar(model_dir, world["root"] / "drill-export", serving.model_name, challenger,
                    **({"handler": DRILL_HANDLER} if faulty_handler else {}))
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["record"] = rollout_local.run_rollout(
                model_dir, world["dataset"], serving, rollout(strategy, **changes), mar, challenger,
                SmokeTest.of_dataset(world["dataset"]), {})
        except BaseException as err:  # noqa: BLE001 - re-raised below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    during: list[tuple[int, bytes]] = []
    named = False
    while thread.is_alive():
        named = named or _evidence(endpoint, source)["version"] == challenger
        if named:
            during += _answers(endpoint, client, world["bodies"])
        else:
            time.sleep(0.2)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    after = _answers(endpoint, client, world["bodies"])

    assert after == before, "the champion's answers after the rollout are those from before, byte for byte"
    for i, (status, body) in enumerate(during):
        assert status == 200, body
        if json.loads(body)["model_version"] == version:
            assert (status, body) == before[i % len(before)], "during the rollout too"
        else:
            assert strategy == "canary", "in shadow, every answer is the champion's"
    record = outcome["record"]
    outcome["during"] = during
    if record["rollout"]["decision"] == "rollback":
        after_state = champion.status()
        assert (after_state["pid"], after_state["proxy_pid"], after_state["model_version"]) == \
            (state["pid"], state["proxy_pid"], version), "the champion's very processes serve on"
        assert record["model_version"] == version and record["endpoint"] == endpoint
        assert not champion.rollout_file.exists() and not (home / CHALLENGER_DIR).exists()
        assert _evidence(endpoint, source)["version"] is None, "no challenger in the serving path"
        assert any(p.name.startswith(f"{challenger}-") for p in (home / "rollouts").iterdir()), "its logs are kept"
    record["_during"] = during
    return record


def _failed(record: dict) -> list[str]:
    return [c["name"] for c in record["rollout"]["criteria"] if c["passed"] is False]


@pytest.mark.parametrize("strategy", ["shadow", "canary"])
def test_a_challenger_that_errors_on_some_inputs_is_rolled_back(world, monkeypatch, strategy):
    record = drill(world, monkeypatch, strategy, "errors-3", faulty_handler=True,
                   **({"share": 0.5} if strategy == "canary" else {}))
    result = record["rollout"]
    assert result["decision"] == "rollback" and _failed(record) == ["error_rate"], result["reason"]
    assert "error_rate" in result["reason"] and result["evidence"]["challenger"]["errors"] >= 1
    assert result["challenger_version"] == "errors-3" and result["champion_version"] == "champion-1"
    if strategy == "canary":
        assert all(json.loads(body)["model_version"] in ("champion-1", "errors-3") for _, body in record["_during"])


def test_a_slow_challenger_is_rolled_back(world, monkeypatch):
    record = drill(world, monkeypatch, "shadow", "slow-4", faulty_handler=True)
    result = record["rollout"]
    assert result["decision"] == "rollback" and _failed(record) == ["p99_latency"], result["reason"]
    p99 = next(c for c in result["criteria"] if c["name"] == "p99_latency")
    assert p99["value"] > 1.5 and result["evidence"]["challenger"]["p99_ms"] >= 60


def test_a_challenger_that_disagrees_with_the_champion_is_rolled_back_early(world, monkeypatch):
    record = drill(world, monkeypatch, "shadow", "swapped-5")
    result = record["rollout"]
    assert result["decision"] == "rollback" and "agreement" in _failed(record), result["reason"]
    agreement = next(c for c in result["criteria"] if c["name"] == "agreement")
    assert agreement["certain"], "it failed whatever the requests still to come might have done"
    assert agreement["value"] < 0.98 and result["evidence"]["agreed"] < result["evidence"]["compared"]


def test_a_challenger_that_fails_its_smoke_test_never_gets_traffic(world, monkeypatch):
    record = drill(world, monkeypatch, "shadow", "permuted-6")
    result = record["rollout"]
    assert result["decision"] == "rollback" and _failed(record) == ["smoke_test"], result["reason"]
    assert result["evidence"]["challenger"]["requests"] == 0 and record["_during"] == []


def test_a_promotion_that_fails_on_the_usual_ports_serves_the_champion_again(world, monkeypatch):
    """The promoted model's new TorchServe fails its smoke test on its own port (the failure injected there, the
    rest real): the champion's archive is served again behind the same proxy, and the step fails saying so."""
    monkeypatch.setattr(rollout_local, "WARM_UP_S", 1.0)
    home, serving = Path(world["serving"].home), world["serving"]
    champion = LocalTorchServe(home)
    before = champion.status()
    real_run = SmokeTest.run

    def failing_on_torchserves_own_port(self, endpoint, version, **kwargs):
        result = real_run(self, endpoint, version, **kwargs)
        if str(kwargs.get("token_file", "")).endswith("key_file.json"):  # only the promotion's smoke test
            result.update(failed=True, summary="injected: the new TorchServe answers nonsense")
        return result

    monkeypatch.setattr(SmokeTest, "run", failing_on_torchserves_own_port)
    with pytest.raises(RuntimeError, match="was to be promoted but .* The champion champion-1 serves again"):
        deploy_local(world["models"]["sound-2"], world["dataset"], serving,
                     rollout("canary", replay=True, min_requests=30))
    after = champion.status()
    assert after["healthy"] and after["model_version"] == "champion-1" and after["endpoint"] == before["endpoint"]
    assert after["proxy_pid"] == before["proxy_pid"] and after["pid"] != before["pid"], "restarted, same proxy"
    assert not champion.rollout_file.exists() and not (home / CHALLENGER_DIR).exists()
    answers = _answers(before["endpoint"], read_token(before["token_file"]), world["bodies"][:20])
    assert {json.loads(body)["model_version"] for _, body in answers} == {"champion-1"}


@pytest.mark.parametrize("strategy, challenger, pause_s", [("shadow", "sound-2", 0.01), ("canary", "champion-1", 0.3)])
def test_a_sound_challenger_is_promoted_without_a_refused_request(world, monkeypatch, strategy, challenger, pause_s):
    """Through deploy_local, as the pipeline calls it. A client keeps sending predictions throughout, and the
    switch to the usual ports refuses none of them. In shadow it sends enough for the evidence (the rollout's
    replay pauses); in canary it trickles, and the replay of the test split gives the evidence."""
    monkeypatch.setattr(rollout_local, "WARM_UP_S", 2.0)
    home, serving = Path(world["serving"].home), world["serving"]
    champion = LocalTorchServe(home)
    state = champion.status()
    endpoint, old_version = state["endpoint"], state["model_version"]
    client = read_token(state["token_file"])
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def keep_asking() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                r = session.post(endpoint, data=world["bodies"][len(answers) % len(world["bodies"])], timeout=30,
                                 headers={"Authorization": f"Bearer {client}", "Content-Type": "image/png"})
                answers.append((r.status_code, r.json().get("model_version", r.text[:100])))
                time.sleep(pause_s)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        record = deploy_local(world["models"][challenger], world["dataset"], serving,
                              rollout(strategy, replay=True, share=0.5, min_agreement=0.9))
    finally:
        stop.set()
        asker.join()
    result = record["rollout"]
    assert result["decision"] == "promote", result["reason"]
    assert result["reason"].startswith("every criterion holds") and "error_rate" in result["reason"]
    assert result["switch_seconds"] > 0
    if strategy == "canary":
        assert result["requests_replayed"] > len(answers), "the replay, not the trickle, gave the evidence"
    else:
        assert result["requests_replayed"] < len(answers), "the replay paused while live traffic arrived"
    assert result["evidence"]["challenger"]["requests"] >= 60
    assert ("agreement" in result["reason"]) == (strategy == "shadow")
    assert [status for status, _ in answers if status != 200] == [], "no request refused, the switch included"
    served = [version for _, version in answers]
    assert served[0] == old_version and served[-1] == challenger
    assert record["model_version"] == challenger and record["endpoint"] == endpoint and record["strategy"] == strategy
    now = champion.status()
    assert now["healthy"] and now["model_version"] == challenger and now["proxy_pid"] == state["proxy_pid"]
    assert now["pid"] != state["pid"], "a new TorchServe on the usual ports behind the same proxy"
    assert not champion.rollout_file.exists() and not (home / CHALLENGER_DIR).exists()
    assert json.loads((home / "state.json").read_text())["model_dir"] == str(world["models"][challenger])
    assert {json.loads(body)["model_version"] for _, body in _answers(endpoint, client, world["bodies"])} == {challenger}
