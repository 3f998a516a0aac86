"""Readiness probe for TorchServe with token authorization on (used by manifests/base/serving-deployment.yaml).

TorchServe 0.12 asks for the inference key even on ``GET /ping``, and it makes up
fresh random keys at every start (written to ``key_file.json`` in its working
directory), so Kubernetes' plain ``httpGet`` probe cannot check it. This probe
runs inside the pod: it reads the key file, renews the inference key through the
loopback-only management API when it is about to expire (the key would otherwise
expire under a long-running pod and take it out of the Service), and asks
``/ping`` with it. Exit 0 only when TorchServe says "Healthy" (every model has
its minimum workers); otherwise print why and exit 1.

Standard library only: a probe runs every few seconds and must start fast (no torch).

    python scripts/torchserve_probe.py --key-file /home/model-server/key_file.json
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path


def _get(url: str, key: str, timeout_s: float) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _expires_at(entry: dict) -> datetime | None:
    text = entry.get("expiration time")
    if not text:
        return None
    # TorchServe writes Java Instant text with nanoseconds ("...T01:25:03.428696140Z"); keep microseconds.
    text = text.rstrip("Z")
    if "." in text:
        whole, frac = text.split(".", 1)
        text = f"{whole}.{frac[:6]}"
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def probe(key_file: Path, inference_url: str, management_url: str, renew_within: timedelta, timeout_s: float) -> str:
    """Renew the inference key if it expires within ``renew_within``, then ping. Returns the status text or raises."""
    if not key_file.is_file():
        raise RuntimeError(f"no key file at {key_file} yet (TorchServe still starting, or started in another directory)")
    keys = json.loads(key_file.read_text())
    expires = _expires_at(keys["inference"])
    if expires is not None and expires - datetime.now(timezone.utc) < renew_within:
        status, body = _get(f"{management_url}/token?type=inference", keys["API"]["key"], timeout_s)
        if status != 200:
            raise RuntimeError(f"renewing the inference key failed: HTTP {status} {body[:200]}")
        keys = json.loads(key_file.read_text())  # TorchServe rewrote the file with the new key
    status, body = _get(f"{inference_url}/ping", keys["inference"]["key"], timeout_s)
    try:
        health = json.loads(body).get("status", body)
    except ValueError:
        health = body
    if status != 200 or health != "Healthy":
        raise RuntimeError(f"/ping answered HTTP {status}: {str(health)[:200]}")
    return health


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key-file", default="/home/model-server/key_file.json", help="TorchServe's key_file.json")
    parser.add_argument("--inference-url", default="http://127.0.0.1:8080", help="inference API base URL")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081", help="management API base URL (loopback)")
    parser.add_argument("--renew-within-min", type=float, default=24 * 60,
                        help="renew the inference key when it expires within this many minutes (default: one day)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="seconds per HTTP request")
    args = parser.parse_args(argv)
    try:
        health = probe(Path(args.key_file), args.inference_url.rstrip("/"), args.management_url.rstrip("/"),
                       timedelta(minutes=args.renew_within_min), args.timeout_s)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        print(f"not ready: {err}", flush=True)
        return 1
    print(health, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
