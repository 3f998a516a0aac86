"""``python -m components.deploy.pods``: the local pods on this Docker engine, as kubectl shows a cluster's."""

from __future__ import annotations

import argparse
import json
import sys

from components.deploy.pods.engine import attach, list_pods
from components.deploy.pods.manifests import PodError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.deploy.pods", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the local pods' names")
    status = commands.add_parser("status", help="each container's state and the pod's IP (JSON)")
    probe = commands.add_parser("probe", help="run every readiness and liveness probe once; exit 1 if one fails")
    logs = commands.add_parser("logs", help="one container's output")
    logs.add_argument("--tail", type=int, default=None, help="only the last lines")
    stop = commands.add_parser("stop", help="delete the pod: preStop hooks, SIGTERM, grace period, SIGKILL")
    stop.add_argument("--grace-period", type=float, default=None,
                      help="seconds before SIGKILL (default: the pod's terminationGracePeriodSeconds)")
    for sub in (status, probe, logs, stop):
        sub.add_argument("name", help="the pod's name")
    logs.add_argument("container")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print("\n".join(list_pods()))
            return 0
        pod = attach(args.name)
        if args.command == "status":
            print(json.dumps({"name": pod.name, "namespace": pod.namespace, "ip": pod.ip, "containers": pod.state()},
                             indent=2))
        elif args.command == "probe":
            results = pod.probe()
            for r in results:
                print(f"{r.container} {r.kind}: {'ok' if r.success else 'FAILED'} ({r.action} -> {r.detail})")
            return 0 if all(r.success for r in results) else 1
        elif args.command == "logs":
            sys.stdout.write(pod.logs(args.container, args.tail))
        else:
            for container, hook in pod.stop(args.grace_period).items():
                print(f"{container} preStop: {'ok' if hook.success else 'FAILED'} ({hook.detail})")
    except PodError as err:
        print(f"pods: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
