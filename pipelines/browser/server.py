"""``mlops ui``: the static run browser (pipelines/browser/site.py) served read-only over HTTP.

* Binds 127.0.0.1 by default; any address that is not loopback is refused unless ``allow_remote`` is given (the
  pages show run configs, endpoints and ledger history). On loopback, requests must name a loopback host in their
  ``Host`` header, so a web page on another origin cannot read the site through DNS rebinding.
* The runs directory is mounted at ``/`` and the site at ``/ui/`` (so the pages' relative links to reports work
  as on disk), but only the site's own files and the report files it links to are served: anything else, the
  serving token included, is 404. GET and HEAD only; every other method is 405.
* Before answering, the site is rebuilt when what it shows changed (``site.inputs_fingerprint``, checked at most
  once per ``check_interval_s``): a new run, a new ledger record or monitoring window shows on the next reload.
"""

from __future__ import annotations

import ipaddress
import mimetypes
import shutil
import socket
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pipelines.browser import site

DEFAULT_HOST = "127.0.0.1"
ALLOWED_METHODS = "GET, HEAD"
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
               "frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".json": "application/json", ".md": "text/plain; charset=utf-8"}


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Site:
    """The built site and what it may serve, rebuilt when its inputs change."""

    def __init__(self, runs_dir: str | Path, serving_home: str | Path | None = None, ledger_uri: str | None = None,
                 check_interval_s: float = 1.0):
        self.runs_dir = Path(runs_dir).resolve()
        self.serving_home = Path(serving_home) if serving_home is not None else site.default_serving_home(runs_dir)
        self.ledger_uri = ledger_uri
        self.out = self.runs_dir / site.SITE_DIR
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._checked = 0.0
        self._fingerprint: tuple | None = None
        self.reports: set[Path] = set()
        self.builds = 0

    def _inputs(self) -> tuple:
        return site.inputs_fingerprint(self.runs_dir, self.serving_home, self.ledger_uri)

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._checked < self.check_interval_s:
                return
            self._checked = time.monotonic()
            inputs = self._inputs()
            if not force and inputs == self._fingerprint:
                return
            _, cat = site.build(self.runs_dir, self.out, serving_home=self.serving_home, ledger_uri=self.ledger_uri)
            self.reports = site.report_files(cat)
            self._fingerprint = inputs
            self.builds += 1

    def resolve(self, url_path: str) -> Path | None:
        """The file a URL path names, if it may be served."""
        relative = urllib.parse.unquote(url_path).lstrip("/")
        if "\x00" in relative:
            return None
        target = (self.runs_dir / relative).resolve()
        site_dir = self.out.resolve()
        if target.is_dir() and target.is_relative_to(site_dir):
            target = target / "index.html"
        if target.is_file() and (target.is_relative_to(site_dir) or target in self.reports):
            return target
        return None


class Handler(BaseHTTPRequestHandler):
    server_version = "kfp-mlops-ui"
    sys_version = ""
    server: UIServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # any method but GET and HEAD: 405, not http.server's 501
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", ALLOWED_METHODS)
        self._end(b"405 method not allowed: this server is read-only (GET, HEAD)\n", "text/plain; charset=utf-8")

    def _end(self, body: bytes, content_type: str, head: bool = False) -> None:
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _host_ok(self) -> bool:
        if self.server.allow_remote:
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return is_loopback(name)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        if not self._host_ok():
            self.send_response(HTTPStatus.MISDIRECTED_REQUEST)
            return self._end(b"421 this server answers only to a loopback host name\n", "text/plain", head)
        path = urllib.parse.urlsplit(self.path).path
        if path in ("", "/", "/" + site.SITE_DIR):
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", f"/{site.SITE_DIR}/index.html")
            return self._end(b"", "text/plain", head)
        ui = self.server.site
        try:
            ui.refresh()
        except Exception as exc:  # noqa: BLE001 - serve the last good site, say why it is stale
            self.log_error("rebuilding the site failed: %s", exc)
        target = ui.resolve(path)
        if target is None:
            self.send_response(HTTPStatus.NOT_FOUND)
            return self._end(b"404 not found\n", "text/plain; charset=utf-8", head)
        content_type = CONTENT_TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0] or \
            "application/octet-stream"
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(target.stat().st_size))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-cache")
        if target.is_relative_to(ui.out.resolve()):  # a report keeps its own scripts, inside its sandboxed iframe
            self.send_header("Content-Security-Policy", PAGE_POLICY)
        self.end_headers()
        if not head:
            with open(target, "rb") as f:
                shutil.copyfileobj(f, self.wfile)


class UIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ui: Site, host: str = DEFAULT_HOST, port: int = 0, allow_remote: bool = False,
                 verbose: bool = False):
        if not allow_remote and not is_loopback(host):
            raise ValueError(f"refusing to serve the run browser on {host}, which is not a loopback address: the "
                             "pages show run configs, endpoints and the release ledger. Use 127.0.0.1, or pass "
                             "--allow-remote to accept that anyone who reaches that address can read them")
        self.site, self.allow_remote, self.verbose = ui, allow_remote, verbose
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ui.refresh(force=True)
        super().__init__((host.strip("[]"), port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/{site.SITE_DIR}/index.html"
