"""The servers under test: the digits model, TorchServe as shipped (and its variants), and the FastAPI peer."""

# No ``from __future__ import annotations`` here: FastAPI reads the peer endpoint's annotations at run time,
# and ``Request`` is only a local name of ``create_peer_app``.
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import MODEL_NAME, ROOT, SCRIPT

# What a --variant may change (A/B runs of the shipped TorchServe settings).
VARIANT_KEYS = ("workers", "batch_size", "max_batch_delay_ms", "netty_threads", "netty_client_threads",
                "job_queue_size", "vmargs", "env")  # env: variables for the server's processes, e.g. {"KFP_MLOPS_GC_FREEZE": "0"}
PEER_ENV = {"model_dir": "BENCH_PEER_MODEL_DIR", "token": "BENCH_PEER_TOKEN"}


# ----------------------------------------------------------------------------- the model

def train_digits(out_dir: Path, seconds: float = 8.0) -> bytes:
    """A small classifier on sklearn digits (one thread, a few seconds); returns one test digit as PNG."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from components.core.models import Classifier, EncoderSpec, save_classifier
    from serving.client import encode_png

    digits = load_digits()
    x = torch.from_numpy((digits.images[:, None] / 16.0).astype(np.float32))
    y = torch.from_numpy(digits.target.astype(np.int64))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier(EncoderSpec(width=16, embed_dim=32), num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.monotonic()
    for _ in range(300):
        idx = torch.randint(0, len(x) - 200, (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if time.monotonic() - start > seconds:
            break
    save_classifier(model.eval(), out_dir, {"class_names": [str(i) for i in range(10)], "model_version": "bench-1"})
    return encode_png(x[-1].numpy())


class NoMetrics:
    """TorchServe's Context wants a metrics object; the peer records none (as most hand-written servers)."""

    def add_time(self, *args, **kwargs) -> None:
        pass


def handler_context(model_dir: str | Path, mms_version: str):
    """The TorchServe Context the handler gets, for the model outside TorchServe (batch size 1, CPU)."""
    from ts.context import Context

    return Context(MODEL_NAME, str(model_dir), {"model": {"modelName": MODEL_NAME}}, batch_size=1, gpu=None,
                   mms_version=mms_version, metrics=NoMetrics(), model_yaml_config={})


# ----------------------------------------------------------------------------- the peer

def create_peer_app():
    """FastAPI app serving the same handler as TorchServe: ``POST /predictions/<model>`` with a bearer token."""
    from fastapi import FastAPI, Request, Response
    from ts.context import RequestProcessor

    from serving.handler import ImageClassifierHandler

    model_dir = os.environ[PEER_ENV["model_dir"]]
    expected = f"Bearer {os.environ[PEER_ENV['token']]}"
    context = handler_context(model_dir, "peer")
    handler = ImageClassifierHandler()
    handler.initialize(context)
    app = FastAPI()

    @app.post("/predictions/{model_name}")
    async def predict(model_name: str, request: Request) -> Response:
        if request.headers.get("authorization") != expected:
            return Response('{"code":401,"message":"Token Authorization failed"}', 401, media_type="application/json")
        if model_name != MODEL_NAME:
            return Response('{"code":404,"message":"Model not found"}', 404, media_type="application/json")
        body = await request.body()
        headers = dict(request.headers)
        headers["body"] = {"content-type": request.headers.get("content-type", "")}
        context.request_processor = [RequestProcessor(headers)]
        answer = handler.handle([{"body": body}], context)[0]  # CPU-bound and ~1 ms: inline beats a thread pool
        status = context.get_response_status(0)[0] or 200
        return Response(answer, status, media_type="application/json")

    return app


def serve_peer(port: int, workers: int) -> None:
    """uvicorn in ``workers`` forked processes sharing one listening socket (as ``uvicorn --workers`` does).

    Forked here instead of ``uvicorn --workers benchmarks.serving:...`` because an installed package
    (opacus) ships a top-level ``benchmarks`` package that shadows this folder for import strings.
    """
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            config = uvicorn.Config(create_peer_app, factory=True, access_log=False, log_level="warning")
            uvicorn.Server(config).run(sockets=[sock])  # as uvicorn's own workers get it (a TCP socket: TCP_NODELAY)
            os._exit(0)
        children.append(pid)

    def stop(*_: Any) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    for child in children:
        os.waitpid(child, 0)


class ServerProcess:
    """A server the benchmark started in a session of its own (``self.process``); stopped with its children."""

    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


class PeerServer(ServerProcess):
    """The FastAPI peer (``create_peer_app``) under uvicorn, ``workers`` processes, on a free loopback port."""

    def __init__(self, model_dir: Path, token: str, workers: int, log_dir: Path | None):
        from serving.processes import free_port

        self.port, self.workers, self.token = free_port(), workers, token
        self.url = f"http://127.0.0.1:{self.port}/predictions/{MODEL_NAME}"
        env = {**os.environ, PEER_ENV["model_dir"]: str(model_dir), PEER_ENV["token"]: token, "OMP_NUM_THREADS": "1"}
        env.pop("KFP_MLOPS_REQUEST_LOG_DIR", None)
        if log_dir:
            env["KFP_MLOPS_REQUEST_LOG_DIR"] = str(log_dir)
        cmd = [sys.executable, str(SCRIPT), "--_peer", json.dumps({"port": self.port, "workers": workers})]
        self.process = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout_s: float = 60) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the FastAPI peer exited with {self.process.returncode}")
            try:
                if requests.post(self.url, data=b"", timeout=1, headers={"Authorization": f"Bearer {self.token}"}).status_code == 400:
                    time.sleep(0.5 * self.workers)  # the other workers finish loading too
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError("the FastAPI peer did not answer within 60 s")


# ----------------------------------------------------------------------------- TorchServe

@dataclass
class TorchServeSetup:
    """One TorchServe to measure: its archive, request log, label and the start settings that differ."""

    name: str
    archive: Path
    request_log_dir: Path | None
    label: str
    start_settings: dict[str, Any]  # LocalTorchServe.start arguments (Netty threads, job queue, JVM, log config)
    env: dict[str, str] = field(default_factory=dict)  # for the server's processes


def torchserve_setups(work: Path, settings: dict[str, Any], variants: dict[str, dict[str, Any]],
                      skip: list[str]) -> list[TorchServeSetup]:
    """The shipped TorchServe ("ours"), without its request log, with TorchServe's own defaults, and each variant.

    ``settings``: the shipped settings (``VARIANT_KEYS``); the archives are built from ``work / "model"``.
    """
    from serving import archive

    def build(export: str, workers: int, batch_size: int, max_batch_delay_ms: int) -> Path:
        return archive.build_mar(work / "model", work / export, MODEL_NAME, "bench-1", workers=workers,
                                 batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms)

    mar = build("export", settings["workers"], settings["batch_size"], settings["max_batch_delay_ms"])
    label = f"torchserve {settings['workers']}w b{settings['batch_size']}/{settings['max_batch_delay_ms']}ms"
    server_keys = ("netty_threads", "netty_client_threads", "job_queue_size", "vmargs")
    shipped = {k: settings[k] for k in server_keys}
    setups = [TorchServeSetup("ours", mar, work / "requests", label, dict(shipped))]
    if "nolog" not in skip:
        setups.append(TorchServeSetup("ours-nolog", mar, None, label + ", request log off", dict(shipped)))
    if "defaults" not in skip:
        # TorchServe as it comes (the same hardening and handler): no batching, its own log4j2
        # configuration, Netty threads, job queue and JVM options at their defaults, request log on.
        plain = build("export-defaults", 1, 1, 100)
        setups.append(TorchServeSetup("defaults", plain, work / "requests-defaults", "torchserve, TorchServe's defaults",
                                      {"netty_threads": settings["netty_threads"], "log_config": None,
                                       "job_queue_size": 100, "vmargs": "", "unbatched_route": False}))
    for vname, changed_settings in variants.items():
        vmar = build(f"export-{vname}", changed_settings["workers"], changed_settings["batch_size"],
                     changed_settings["max_batch_delay_ms"])
        changed = {k: v for k, v in changed_settings.items() if v != settings[k]}
        setups.append(TorchServeSetup(
            vname, vmar, work / f"requests-{vname}", f"{vname[8:]}: {json.dumps(changed)}"[:40],
            {k: changed_settings[k] for k in server_keys}, env=changed_settings["env"]))
    return setups


def start_torchserve(setup: TorchServeSetup, home: Path, workers: int, servers: list) -> dict[str, Any]:
    """Start one setup (added to ``servers`` first: stopped by the caller also when the start fails); return its
    target, measured directly: TorchServe's own loopback port, with its inference key. A client there takes the
    proxy's route: at concurrency 1 (nothing else in flight) the unbatched twin's URL (``url_alone``), else the
    batched model's (``url``)."""
    from serving.client import read_token
    from serving.processes import free_port
    from serving.server import LocalTorchServe

    server = LocalTorchServe(home)
    servers.append(server)
    saved_env = dict(os.environ)
    os.environ.update(setup.env)  # the server's processes inherit it (LocalTorchServe.start copies os.environ)
    try:
        record = server.start(setup.archive, MODEL_NAME, inference_port=free_port(), management_port=free_port(),
                              metrics_port=free_port(), workers=workers, request_log_dir=setup.request_log_dir,
                              **setup.start_settings)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    twin = record.get("unbatched_model")
    target = {"url": record["torchserve_endpoint"], "pid": record["pid"], "metrics": record["metrics_endpoint"],
              "url_alone": record["torchserve_endpoint"].rsplit("/", 1)[0] + f"/{twin}" if twin else None,
              "record": record, "token": read_token(record["key_file"], "inference"), "label": setup.label,
              "access_log": server.logs / "access_log.log"}
    return target


def stop_server(server) -> None:
    """Stop a server of either kind: a LocalTorchServe quietly, the peer with its process group."""
    server.stop() if isinstance(server, ServerProcess) else server.stop(quiet=True)


def start_servers(work: Path, settings: dict[str, Any], variants: dict[str, dict[str, Any]], skip: list[str],
                  peer_workers: int, servers: list) -> dict[str, dict[str, Any]]:
    """Every server to measure, started (each added to ``servers`` for the caller to stop): name -> its target
    (url, pid, token, label, and for TorchServe its metrics endpoint and access log)."""
    from serving.client import read_token

    targets = {setup.name: start_torchserve(setup, work / f"home-{setup.name}", settings["workers"], servers)
               for setup in torchserve_setups(work, settings, variants, skip)}
    if "batched" not in skip and targets["ours"]["url_alone"]:
        # The batched model alone, without the twin, at the lower concurrencies only: TorchServe waits up to
        # maxBatchDelay for a second request even when none is queued, so this shows what the twin saves a lone
        # request (the concurrency-1 latency) against what the rest of the path costs.
        targets["ours-batched"] = {**targets["ours"], "url_alone": None,
                                   "label": targets["ours"]["label"] + ", batched model only"}
    if "proxied" not in skip:
        # What clients call: the public endpoint, the auth proxy that LocalTorchServe (and each
        # serving pod on Kubernetes) runs in front of TorchServe. Same TorchServe as "ours".
        ours = targets["ours"]["record"]
        targets["ours-proxied"] = {"url": ours["endpoint"], "pid": ours["pid"], "proxy_pid": ours["proxy_pid"],
                                   "token": read_token(ours["token_file"]),
                                   "label": targets["ours"]["label"] + ", behind auth proxy"}
    if "peer" not in skip:
        peer = PeerServer(work / "model", "peer-token", peer_workers, work / "peer-requests")
        servers.append(peer)
        targets["peer"] = {"url": peer.url, "pid": peer.pid, "token": peer.token,
                           "label": f"fastapi/uvicorn {peer_workers}w"}
    return targets
