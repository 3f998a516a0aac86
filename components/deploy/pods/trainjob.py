"""A rendered Kubeflow Trainer ``TrainJob`` as the node pods its controller would create, to run with
``start_pod``: one pod per node, named and addressed as JobSet names them, with the ``PET_*`` variables the
runtime's Torch plugin sets (``pkg/runtime/framework/plugins/torch/torch.go``; components/train/trainjob.py
explains them), so ``torchrun`` in the TrainJob's command finds its rendezvous exactly as on a cluster.

What comes from where: image, command, args, env and resources from the TrainJob (``spec.trainer``); node count
and processes per node from it too; the rest of the pod (identity, security context, volumes) from the runtime's
node template, which lives on the cluster, not in manifests/: ``NODE_TEMPLATE`` is the one used here.
"""

from __future__ import annotations

import copy
from typing import Any

from components.deploy.pods.manifests import PodError, upsert_env

NODE = "node"  # the runtime's replicated job and its container (Trainer's constants.Node)
MASTER_PORT = 29400  # Trainer's constants.ContainerTrainerPort: torchrun's rendezvous on node 0
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the Job controller's annotation: the node's rank
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
# The node pod around the TrainJob's container. Upstream's torch-distributed ClusterTrainingRuntime (kubeflow/trainer
# manifests/base/runtimes/torch_distributed.yaml) sets no security context, which the namespace's enforced
# "restricted" Pod Security rejects; this is what a runtime for that namespace needs: the identity and hardening of
# the manifests' own pods, and a writable /tmp under the read-only root filesystem.
NODE_TEMPLATE: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [{
        "name": NODE,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }],
    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}],
}


def trainjob_pods(trainjob: dict, node_template: dict | None = None) -> list[dict]:
    """The Pods the Trainer (torch-distributed runtime, JobSet, an Indexed Job) runs for ``trainjob``:
    ``<name>-node-0-<i>``, reachable as ``<name>-node-0-<i>.<name>``, rank ``i`` from the completion index."""
    if trainjob.get("kind") != "TrainJob":
        raise PodError(f"expected a TrainJob, got {trainjob.get('kind')}")
    name, namespace = trainjob["metadata"]["name"], trainjob["metadata"].get("namespace", "default")
    trainer = trainjob["spec"].get("trainer") or {}
    nodes, procs = int(trainer.get("numNodes", 1)), trainer.get("numProcPerNode", 1)
    if not isinstance(procs, int):
        raise PodError(f"numProcPerNode {procs!r}: the local run needs a number (the plugin's 'auto' counts the "
                       "node's GPUs or CPUs)")
    template = copy.deepcopy(node_template if node_template is not None else NODE_TEMPLATE)
    container = next((c for c in template["containers"] if c["name"] == NODE), None)
    if container is None:
        raise PodError(f"the runtime's node template has no container named {NODE!r}")
    container["image"] = trainer.get("image", container.get("image"))
    for key in ("command", "args"):
        if key in trainer:
            container[key] = list(trainer[key])
    if "resourcesPerNode" in trainer:
        container["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
    rank = {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}}
    container["env"] = upsert_env(container.get("env") or [], copy.deepcopy(trainer.get("env") or []))
    container["env"] = upsert_env(container["env"], [
        {"name": "JOB_COMPLETION_INDEX", **rank},  # the Job controller's, for an Indexed Job
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(procs)},
        {"name": "PET_NODE_RANK", **rank},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-{NODE}-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
    ])
    container["ports"] = [{"containerPort": MASTER_PORT}]
    pods = []
    for index in range(nodes):
        pod_name = f"{name}-{NODE}-0-{index}"
        spec = {**copy.deepcopy(template), "hostname": pod_name, "subdomain": name, "restartPolicy": "Never"}
        pods.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": namespace,
                         "labels": {**(trainjob["metadata"].get("labels") or {}), JOBSET_NAME_LABEL: name,
                                    COMPLETION_INDEX: str(index)},
                         "annotations": {COMPLETION_INDEX: str(index)}},
            "spec": spec,
        })
    return pods
