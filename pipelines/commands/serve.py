"""``mlops serve start|stop|status`` (the local server) and ``mlops predict`` (ask it about image files)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines import config as config_mod
from pipelines.commands import add_config_args, add_json, add_runs_dir, emit_json, human, load_config

# What serve stop/status and predict use of the serving area; start uses every serving setting.
HOME_ONLY = frozenset({"serving_home"})


def cmd_serve_status(args: argparse.Namespace) -> int:
    from components.deploy.containers import served_from
    from serving.server import curl_example

    home = Path(load_config(args).serving.home).resolve()
    status = served_from(home).status()
    if args.json:
        emit_json(args, status)
    elif not status["running"]:
        print(f"No TorchServe is running from {home}. Start one with 'mlops serve start' (serves the latest run's model).")
    else:
        state = "healthy" if status["healthy"] else f"NOT healthy: {status['problem']}"
        print(f"TorchServe (pid {status['pid']}) serves '{status['model']}' version {status['model_version']}: {state}, "
              f"{status['workers_ready']} worker(s) ready.")
        print(f"  endpoint:    {status['endpoint']}  (also /explanations/{status['model']})")
        print(f"  token:       {status['token_file']}")
        print(f"  request log: {status['request_log_dir']}")
        print(f"  logs:        {Path(status['log']).parent}")
        print(f"  try:         mlops predict --digit 3   or   {curl_example(status)}")
    return 0 if status["running"] and status["healthy"] else 1


def cmd_serve_stop(args: argparse.Namespace) -> int:
    from components.deploy.containers import served_from

    home = Path(load_config(args).serving.home).resolve()
    served_from(home).stop()  # the local processes, or the serving containers of mlops run --runner docker
    if args.json:
        emit_json(args, {"home": str(home), "running": False})
    return 0


def cmd_serve_start(args: argparse.Namespace) -> int:
    """Serve a released model: the newest, or the named run's (a blocked one only with an override)."""
    from components.deploy.local import deploy_local
    from pipelines.local import latest_released_run, read_summary, release_problem
    from serving.server import curl_example

    cfg = load_config(args)
    home = Path(cfg.serving.home).resolve()
    out = human(args)
    run_dir = Path(args.runs_dir) / args.run_id if args.run_id else latest_released_run(args.runs_dir)
    summary = read_summary(run_dir)
    problem = release_problem(summary)
    override = None
    if problem:
        if "model" not in summary.get("artifacts", {}) or not summary.get("gates"):
            print(f"mlops serve start: {problem}; nothing to serve", file=sys.stderr)
            return 1
        if not cfg.gates.override:
            print(f"mlops serve start: {problem}, so its model was not released. To serve it anyway, say who "
                  "accepts the risk and why: --gates-override --gates-override-reason '...'", file=sys.stderr)
            return 3
        override = {"reason": cfg.gates.override_reason, "problem": problem}
    artifacts = summary["artifacts"]
    try:
        import contextlib

        with contextlib.redirect_stdout(out):  # the server's own progress lines
            record = deploy_local(artifacts["model"], artifacts["dataset"], cfg.serving)
    except (RuntimeError, TimeoutError) as err:  # port taken, server died at startup, smoke test failed
        print(f"mlops serve start: {err}", file=sys.stderr)
        return 1
    released = _record_served_run(cfg, home, summary["run_id"], record, override)
    if override:
        print(f"WARNING: serving a model its gates did not release ({problem}); override recorded by "
              f"{released.actor} in the release ledger {released_ledger(cfg)} (released {released.id}): "
              f"{override['reason']}", file=out)
    print(f"Serving the model of run {summary['run_id']} at {record['endpoint']} (token in "
          f"{record['token_file']}). 'mlops serve status' checks it, 'mlops serve stop' stops it.", file=out)
    print(f"  try: mlops predict --digit 3   or   {curl_example(record)}", file=out)
    if args.json:
        emit_json(args, {**record, "run_id": summary["run_id"], "released_record": released.id,
                   **({"override": override} if override else {})})
    return 0


def released_ledger(cfg: config_mod.Config) -> str:
    from components.core.ledger import location

    return location(cfg.serving)


def _record_served_run(cfg: config_mod.Config, home: Path, run_id: str, record: dict, override: dict | None):
    """The model served by hand, in the release ledger: a ``released`` record (parent: the run's gated record; an
    override with its reason and who gave it), pointed to by the serving state."""
    from components.core.ledger import Ledger
    from components.deploy.ledger import record_release
    from pipelines.release_actions import note_served

    ledger = Ledger(released_ledger(cfg))
    version = record["model_version"]
    gated = ledger.latest("gated", run_id=run_id, model_version=version)
    released, _ = record_release(ledger, record, model_name=cfg.serving.model_name, model_version=version,
                                 target="local", gated_record=gated.id if gated else "", run_id=run_id,
                                 reason="mlops serve start", **({"override": override} if override else {}))
    note_served(home, ledger, released)
    return released


# -- mlops predict


IMAGE_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}


def content_type_of(body: bytes, name: str) -> str:
    """image/png or image/jpeg from the file's first bytes; ValueError for anything else."""
    for magic, kind in IMAGE_TYPES.items():
        if body.startswith(magic):
            return kind
    raise ValueError(f"{name} is not a PNG or JPEG image")


def example_digit(digit: int) -> bytes:
    """A real handwritten digit as PNG: the first ``digit`` of scikit-learn's 8x8 digits (pixels 0-16)."""
    from sklearn.datasets import load_digits

    from serving.client import encode_png

    data = load_digits()
    index = int((data.target == digit).nonzero()[0][0])
    return encode_png(data.images[index] / 16.0)


def served_endpoint(home: Path) -> dict:
    """The endpoint and token file of what serves from ``home``; FileNotFoundError when nothing serves."""
    from components.deploy.containers import served_from

    status = served_from(home).status()
    if not status.get("running") or not status.get("endpoint"):
        raise FileNotFoundError(f"no model is served from {home}: run 'mlops run' or 'mlops serve start' first "
                                "(or pass --serving-home where it serves)")
    return status


def cmd_predict(args: argparse.Namespace) -> int:
    from serving.client import predict, read_token

    if not args.images and args.digit is None:
        raise ValueError("give image files (PNG or JPEG, any size: the server resizes them) or --digit N")
    if args.save and args.digit is None:
        raise ValueError("--save writes the --digit example; give --digit N too")
    inputs: list[tuple[str, bytes]] = []
    if args.digit is not None:
        body = example_digit(args.digit)
        name = f"digit {args.digit} (scikit-learn's digits)"
        if args.save:
            Path(args.save).write_bytes(body)
            name = args.save
            print(f"wrote {args.save}: a handwritten {args.digit}, 8x8 PNG", file=human(args))
        inputs.append((name, body))
    for path in args.images:
        inputs.append((path, Path(path).read_bytes()))  # a missing file: FileNotFoundError, exit 1, nothing sent
    served = served_endpoint(Path(load_config(args).serving.home).resolve())
    token = read_token(served["token_file"])
    results, failed = [], 0
    for name, body in inputs:
        try:
            answer = predict(served["endpoint"], body, token, content_type=content_type_of(body, name))
            results.append({"file": name, "label": answer["label"], "class_index": answer["class_index"],
                            "confidence": answer["confidence"], "model_version": answer.get("model_version")})
            print(f"{name}: {answer['label']} (confidence {answer['confidence']:.3f})", file=human(args))
        except (ValueError, RuntimeError, OSError) as exc:  # one bad file does not stop the others
            failed += 1
            results.append({"file": name, "error": str(exc)})
            print(f"{name}: ERROR {exc}", file=sys.stderr)
    if args.json:
        emit_json(args, {"endpoint": served["endpoint"], "predictions": results})
    return 1 if failed else 0


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="start, stop or inspect the local TorchServe",
                       description="Manage the local TorchServe (loopback, token auth on, model-management API off).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    a = actions.add_parser("start", help="serve the newest released run's model (or --run-id's)",
                           description="Serve the newest run whose model its gates released; a blocked run's model "
                                       "only with --gates-override and a reason, which is recorded in the release "
                                       "ledger. Exit code 3 = the run's gates did not release its model.")
    add_runs_dir(a)
    a.add_argument("--run-id", help="serve this run's model instead of the newest released one")
    override = a.add_argument_group("serving a model its gates blocked")
    override.add_argument("--gates-override", dest="gates_override", default=None, action="store_true",
                          help="serve the --run-id run's model although a gate blocked it (needs a reason)")
    override.add_argument("--gates-override-reason", dest="gates_override_reason", default=None, metavar="TEXT",
                          help="who accepts the risk and why (recorded in the release ledger)")
    add_json(a, "the deployment record")
    add_config_args(a, ("serving",))
    a.set_defaults(func=cmd_serve_start)

    a = actions.add_parser("stop", help="stop the proxy, drain the request log, stop TorchServe",
                           description="Stop what serves from serving.home: the auth proxy, then TorchServe, after "
                                       "the request log is drained.")
    add_json(a, "the outcome")
    add_config_args(a, ("serving",), only=HOME_ONLY)
    a.set_defaults(func=cmd_serve_stop)

    a = actions.add_parser("status", help="health, endpoint, token file, a line to try it",
                           description="What serves from serving.home and whether it is healthy. Exit code 0 = "
                                       "running and healthy, 1 = not.")
    add_json(a, "the status")
    add_config_args(a, ("serving",), only=HOME_ONLY)
    a.set_defaults(func=cmd_serve_status)

    p = sub.add_parser("predict", help="classify image files (or a built-in digit) with the local endpoint",
                       description="Send each image (PNG or JPEG, any size: the server converts and resizes it) to "
                                   "the model served from serving.home, with the token from its serving state; print "
                                   "the class and confidence of each. --digit N sends a real handwritten N from "
                                   "scikit-learn's digits (--save FILE keeps it as a PNG for curl). Exit code 1 = a "
                                   "file failed or nothing is served.")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="PNG or JPEG files")
    p.add_argument("--digit", type=int, choices=range(10), metavar="N",
                   help="also send a built-in handwritten digit N (0-9)")
    p.add_argument("--save", metavar="FILE", help="with --digit: write that digit's PNG to FILE")
    add_json(p, "the predictions")
    add_config_args(p, ("serving",), only=HOME_ONLY)
    p.set_defaults(func=cmd_predict)
