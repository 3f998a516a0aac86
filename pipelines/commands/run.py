"""``mlops run`` (the pipeline on this machine, after the preflight checks) and ``mlops compile``."""

from __future__ import annotations

import argparse
import contextlib
import sys

from pipelines import config as config_mod
from pipelines.commands import add_config_args, add_json, add_runs_dir, emit_json, human, load_config

# The settings people change first: --help lists these; --help-all and 'mlops config show' list the rest.
FIRST_SETTINGS = frozenset({
    "data_source", "data_seed", "pretrain_objective", "pretrain_arch", "pretrain_epochs", "finetune_epochs",
    "finetune_mode", "finetune_label_fraction", "finetune_dp_epsilon", "gates_min_test_accuracy", "gates_override",
    "gates_override_reason", "serving_home", "serving_inference_port", "rollout_strategy",
})
# What compile does not use: where a run is submitted (mlops submit, mlops schedule create).
CONNECTION_SETTINGS = frozenset({"cluster_kfp_host", "cluster_namespace", "cluster_experiment",
                                 "cluster_pipeline_name", "cluster_service_account"})


def cmd_run(args: argparse.Namespace) -> int:
    from components.deploy.pods import PodError
    from pipelines import doctor
    from pipelines.local import SUBPROCESS, new_run_id, process_started, run_environment, run_local
    from pipelines.warm_parents import WarmParents

    started = process_started()  # the run's seconds count from where the person's wait began
    cfg = load_config(args)
    out = human(args)
    run_id = args.run_id or new_run_id()
    # The warm parents start first: their imports overlap the preflight checks and the pipeline's compile.
    with WarmParents(enabled=args.warm_start and args.runner == SUBPROCESS, env=run_environment(run_id)) as parents:
        if not args.skip_doctor:
            checks = doctor.preflight(cfg, args.runs_dir, args.runner)
            failed = [c for c in checks if c.status == doctor.FAIL]
            for check in checks:
                if check.status != doctor.OK:
                    print(check.line(), file=sys.stderr)
            if failed:
                print(f"mlops run: {len(failed)} preflight check(s) failed; nothing ran. Fix them (mlops doctor "
                      "checks again) or pass --skip-doctor.", file=sys.stderr)
                return 2
        try:
            with contextlib.redirect_stdout(out):  # with --json, the run's progress goes to stderr
                summary = run_local(cfg, runs_dir=args.runs_dir, run_id=run_id, serve_after=args.serve_after,
                                    verbose=args.verbose, runner=args.runner, warm_start=args.warm_start,
                                    warm_parents=parents, started=started)
        except PodError as exc:  # --runner docker without an engine, images or manifests: nothing ran
            print(f"mlops run: {exc}", file=sys.stderr)
            return 1
    if args.json:
        emit_json(args, summary)
    return 0 if summary["status"] == "succeeded" else (3 if summary["status"] == "blocked" else 1)


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.pipeline import compile_pipeline

    cfg = load_config(args, config_mod.CLUSTER)
    path = compile_pipeline(args.output, cfg.cluster, defaults=cfg)
    if args.json:
        emit_json(args, {"output": str(path), "image": cfg.cluster.image, "serving_image": cfg.cluster.serving_image})
    else:
        print(f"Compiled the pipeline for image {cfg.cluster.image} to {path}.")
        print("Upload it in the KFP UI (Pipelines > Upload pipeline) and start a run from its page.")
    return 0


def add_parsers(sub) -> None:
    from pipelines.local import RUNNERS

    p = sub.add_parser("run", help="run the whole pipeline on this machine (kfp.local)",
                       description="Run ingest → pretrain → finetune → evaluate → privacy → robustness → deploy → "
                                   "monitor through kfp.local, after the preflight checks of 'mlops doctor'. Writes "
                                   "runs/<run-id>/summary.json. Exit code 0 = released, 3 = a gate blocked the "
                                   "release, 1 = a step failed, 2 = invalid settings or a failed preflight check "
                                   "(nothing ran).")
    add_runs_dir(p)
    p.add_argument("--run-id", help="name of the run directory (default: a timestamp)")
    p.add_argument("--runner", choices=RUNNERS, default="subprocess",
                   help="how the steps run: 'subprocess' (default: processes of this Python, this checkout's code) "
                        "or 'docker' (containers of cluster.image, served from containers of cluster.serving_image "
                        "as the manifests' serving Deployment; needs a Docker engine and 'make image')")
    p.add_argument("--serve-after", default=True, action=argparse.BooleanOptionalAction,
                   help="keep TorchServe running after the run (default); --no-serve-after stops it")
    p.add_argument("--skip-doctor", action="store_true", help="skip the preflight checks (mlops doctor)")
    p.add_argument("--warm-start", default=True, action=argparse.BooleanOptionalAction,
                   help="start each step of the subprocess runner as a fork of a pre-imported Python (default); "
                        "--no-warm-start: a fresh Python per step, as kfp.local does")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print kfp.local's full output (always written to runs/<run-id>/pipeline.log)")
    add_json(p, "the run summary (summary.json)")
    add_config_args(p, config_mod.PARAMETER_AREAS, shown=FIRST_SETTINGS)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compile", help="compile the pipeline to KFP v2 YAML for a cluster",
                       description="Compile the pipeline for Kubeflow Pipelines. Run parameters keep their defaults "
                                   "from the config and are editable in the KFP UI; cluster settings are baked in.")
    p.add_argument("-o", "--output", default="pipeline.yaml", help="output file (default: pipeline.yaml)")
    add_json(p, "the output file and images")
    add_config_args(p, ("cluster",), only=frozenset(p.key for p in config_mod.parameters(("cluster",)))
                    - CONNECTION_SETTINGS)
    p.set_defaults(func=cmd_compile)
