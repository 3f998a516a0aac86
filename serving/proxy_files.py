"""The files the auth proxy watches: the token files (client and source tokens, one per line, mounted from
Secrets) and TorchServe's ``key_file.json``; each re-read when it changes, so rotations need no restart.
``serving/rollout_router.py`` watches the rollout file the same way."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from pathlib import Path

from components.core import names

MIN_TOKEN_CHARS = 16  # a guessable client token would make the whole gate pointless


class _Watched:
    """A file re-read when its identity (inode, size, mtime) changes, at most once per ``check_every_s``."""

    def __init__(self, path: str | Path, check_every_s: float):
        self.path, self.check_every_s = Path(path), check_every_s
        self._stamp: tuple | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()

    def changed(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._checked_at < self.check_every_s:
            return False
        with self._lock:
            self._checked_at = now
            try:
                st = self.path.stat()  # follows the kubelet's ..data symlink: a swapped Secret is a new inode
            except OSError:
                return False  # gone for a moment (a swap in progress): keep what was read
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            return True


class ClientTokens:
    """The accepted tokens: one per non-empty line of a file mounted from a Secret."""

    def __init__(self, path: str | Path, check_every_s: float = 1.0, what: str = "client token file",
                 secret: str = names.SERVING_TOKEN_SECRET):
        self._file = _Watched(path, check_every_s)
        self._what, self._secret = what, secret
        self._digests = self._read()  # fail at start when the file is missing or weak
        self._file.changed(force=True)

    def _read(self) -> list[bytes]:
        path, what = self._file.path, self._what
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise ValueError(f"cannot read the {what} {path}: {err}; mount the Secret "
                             f"(kubectl create secret generic {self._secret} --from-literal=token=...)") from None
        tokens = [line.strip() for line in lines if line.strip()]
        if not tokens:
            raise ValueError(f"the {what} {path} holds no token (one per line)")
        weak = [i + 1 for i, t in enumerate(tokens) if len(t) < MIN_TOKEN_CHARS]
        if weak:
            raise ValueError(f"token(s) on line(s) {weak} of {path} are shorter than {MIN_TOKEN_CHARS} characters; "
                             "use e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        return [hashlib.sha256(t.encode()).digest() for t in tokens]

    def accepts(self, presented: str) -> bool:
        if self._file.changed():
            try:
                self._digests = self._read()
            except ValueError as err:  # a broken update must not lock everyone out, nor let everyone in
                print(f"[auth-proxy] keeping the previous tokens: {err}", flush=True)
        digest = hashlib.sha256(presented.encode()).digest()
        matched = False
        for known in self._digests:  # no early exit: the time taken does not tell which line matched
            matched |= hmac.compare_digest(digest, known)
        return matched


class PodKey:
    """TorchServe's inference key from its ``key_file.json``, re-read when the file changes."""

    def __init__(self, path: str | Path, check_every_s: float = 1.0):
        self._file = _Watched(path, check_every_s)
        self._key: str | None = None

    def get(self, force: bool = False) -> str | None:
        if self._file.changed(force=force) or self._key is None:
            try:
                key = json.loads(self._file.path.read_text())["inference"]["key"]
                if isinstance(key, str) and re.fullmatch(r"[\x21-\x7e]+", key):  # it goes into a header line
                    self._key = key
            except (OSError, ValueError, KeyError, TypeError):
                pass  # TorchServe not started yet, or writing the file: keep the last key (or None)
        return self._key
