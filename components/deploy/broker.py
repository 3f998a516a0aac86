"""The serving broker: how the deploy step, in its container, gets serving containers started without the engine.

Under ``mlops run --runner docker`` the deploy step must start containers, and a container that can reach the
Docker engine can do anything root can on the host (mount ``/``, run privileged containers). kfp.local gives
every step the same container settings, so mounting the engine's socket into the deploy step would hand it to
every step, ingest (which parses whatever data it is given) included. Instead ``mlops run`` keeps the engine:
it listens on a Unix socket in a private directory mounted into the steps, and answers two requests only:

* ``serve``: serve the .mar the deploy step of *this* run built (its path must lie in that step's own
  directory under this run's pipeline root, and every gate step of the same pipeline run must have returned
  True: the broker reads their outputs itself), with the serving settings ``mlops run`` was started with;
* ``stop``: stop the serving pod this broker started (the deploy step's smoke test failed).

Everything else (which images, commands, volumes, ports, users) comes from the manifests and the settings of
the person who started the run, never from the request. The peer's uid (``SO_PEERCRED``) must be the steps'.
One JSON object per line in each direction; the client is standard library only (the step images hold no
Docker SDK).
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

SOCKET_ENV = "KFP_MLOPS_SERVING_BROKER"  # the socket's path, in the steps' environment
SOCKET_NAME = "serving.sock"
MAX_REQUEST_BYTES = 64 * 1024
DEPLOY_STEP = "deploy"


class BrokerRefused(RuntimeError):
    """The broker would not (or could not) do what was asked; the message says why."""


def request(socket_path: str | Path, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Send one request to the broker; its record, or BrokerRefused with its reason."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout_s)
        try:
            conn.connect(str(socket_path))
        except OSError as err:
            raise BrokerRefused(f"the serving broker at {socket_path} does not answer ({err}): the deploy step "
                                "serves from containers only under 'mlops run --runner docker'") from None
        conn.sendall(json.dumps(payload).encode() + b"\n")
        with conn.makefile("rb") as reader:
            line = reader.readline()
    if not line:
        raise BrokerRefused(f"the serving broker at {socket_path} closed the connection without an answer")
    answer = json.loads(line)
    if not answer.get("ok"):
        raise BrokerRefused(answer.get("error", "refused without a reason"))
    return answer["record"]


def gates_passed(pipeline_run_dir: Path, gate_steps: tuple[str, ...]) -> list[str]:
    """The gate steps of a kfp.local pipeline run that did not return True (empty: all passed)."""
    failed = []
    for step in gate_steps:
        try:
            output = json.loads((pipeline_run_dir / step / "executor_output.json").read_text())
        except (OSError, ValueError):
            failed.append(f"{step} (no output)")
            continue
        if output.get("parameterValues", {}).get("Output") is not True:
            failed.append(step)
    return failed


class ServingBroker:
    """The broker of one run: ``with ServingBroker(...) as broker:`` listens on ``broker.socket_path``.

    ``serve(request)`` and ``stop()`` do the work on this side (``containers.serve_release`` and
    ``containers.stop_serving`` with the run's settings); they are only called for requests that passed the
    checks above. ``allowed_uid``: the uid the steps run as (None: any). ``owner``: (uid, gid) the socket's
    directory is handed to, so that uid may connect (root only; see ``containers.local_identity``).
    """

    def __init__(self, pipeline_root: str | Path, gate_steps: tuple[str, ...],
                 serve: Callable[[dict[str, Any]], dict[str, Any]], stop: Callable[[], dict[str, Any]],
                 allowed_uid: int | None, owner: tuple[int | None, int | None] = (None, None)):
        self.pipeline_root = Path(pipeline_root).resolve()
        self.gate_steps, self.serve, self.stop_serving = gate_steps, serve, stop
        self.allowed_uid, self.owner = allowed_uid, owner
        self.served = False
        # A short path: a Unix socket's path is limited to about 100 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="kfp-mlops-broker-", dir="/tmp"))
        self.socket_path = self.directory / SOCKET_NAME
        self._server: socketserver.UnixStreamServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> ServingBroker:
        broker = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    answer = {"ok": True, "record": broker.handle(self.connection, self.rfile.readline(MAX_REQUEST_BYTES))}
                except Exception as err:  # noqa: BLE001 - every failure goes back to the step as its reason
                    answer = {"ok": False, "error": f"{type(err).__name__}: {err}" if not isinstance(err, BrokerRefused)
                              else str(err)}
                self.wfile.write(json.dumps(answer, default=str).encode() + b"\n")

        self._server = socketserver.UnixStreamServer(str(self.socket_path), Handler)
        uid, gid = self.owner
        if os.getuid() == 0 and uid is not None:
            os.chown(self.directory, uid, gid if gid is not None else -1)
            os.chown(self.socket_path, uid, gid if gid is not None else -1)
        os.chmod(self.socket_path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, name="serving-broker", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.socket_path.unlink(missing_ok=True)
        self.directory.rmdir()

    def _peer_uid(self, connection: socket.socket) -> int:
        creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]

    def handle(self, connection: socket.socket, line: bytes) -> dict[str, Any]:
        peer = self._peer_uid(connection)
        if self.allowed_uid is not None and peer != self.allowed_uid:
            raise BrokerRefused(f"uid {peer} may not ask for serving containers (the steps run as {self.allowed_uid})")
        try:
            payload = json.loads(line)
        except ValueError:
            raise BrokerRefused("the request is not one line of JSON") from None
        with self._lock:  # one deploy at a time
            if payload.get("op") == "serve":
                record = self.serve(self.checked(payload))
                self.served = True
                return record
            if payload.get("op") == "stop":
                if not self.served:
                    raise BrokerRefused("this run has started no serving containers to stop")
                return self.stop_serving()
        raise BrokerRefused(f"unknown request {payload.get('op')!r}: the broker answers 'serve' and 'stop'")

    def _inside_run(self, path: str | None, what: str) -> Path:
        if not path:
            raise BrokerRefused(f"the request names no {what}")
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.pipeline_root):
            raise BrokerRefused(f"{what} {path} is not under this run's pipeline root {self.pipeline_root}")
        return resolved

    def checked(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The serve request with its paths resolved, if it is one this run's deploy step may make."""
        archive = self._inside_run(payload.get("archive"), "archive")
        parts = archive.relative_to(self.pipeline_root).parts
        if len(parts) < 3 or parts[1] != DEPLOY_STEP or not archive.is_file():
            raise BrokerRefused(f"archive {archive} is not a file the deploy step of this run wrote")
        blocked = gates_passed(self.pipeline_root / parts[0], self.gate_steps)
        if blocked:
            raise BrokerRefused(f"not serving: these gates of pipeline run {parts[0]} did not pass: {', '.join(blocked)}")
        version = str(payload.get("model_version") or "")
        if not version or len(version) > 128 or not all(ch.isalnum() or ch in "._-+" for ch in version):
            raise BrokerRefused(f"model version {version!r} is not a version string")
        return {"archive": archive, "model_version": version,
                "model_dir": self._inside_run(payload.get("model_dir"), "model_dir"),
                "dataset_dir": self._inside_run(payload.get("dataset_dir"), "dataset_dir")}
