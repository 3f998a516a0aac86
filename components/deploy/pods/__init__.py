"""Rendered Kubernetes pod specs, run as pods on this machine's Docker engine (docs/cluster.md, "The manifests,
run locally").

Everything a container gets comes from the rendered YAML: command and args, env (values, ConfigMaps, Secrets,
the downward API), volumes (emptyDir, ConfigMap, Secret), user and security context, resources, probes and
hooks. What a cluster would hold besides (the ConfigMaps as rendered, the Secrets you would create) is passed in.

    from components.deploy import pods

    objects = pods.render("manifests/overlays/dev")
    configmaps = pods.config_maps(objects)
    configmaps["kfp-mlops-storage"]["S3_ENDPOINT_URL"] = f"http://{pods.ensure_network()}:9000"
    pod = pods.start_pod(pods.find(objects, "Deployment", "kfp-mlops-serving"), name="serving-local",
                         configmaps=configmaps, secrets={"kfp-mlops-serving-token": {"token": "..."}, ...},
                         publish={8080: 18080})
    pod.wait_ready(timeout_s=300)            # startup, readiness and liveness probes, as the kubelet runs them
    pod.url("inference", "/predictions/digits"), pod.published("inference")
    pod.exec("torchserve", ["id", "-u"]), pod.logs("auth-proxy"), pod.state()
    pod.stop()                               # preStop hooks, SIGTERM, grace period, SIGKILL; then removed
    pods.attach("serving-local").stop()      # the same from another process
"""

from components.deploy.pods.engine import (
    DEFAULT_NETWORK,
    ExecResult,
    Pod,
    attach,
    docker_client,
    ensure_network,
    list_pods,
    start_pod,
)
from components.deploy.pods.manifests import PodError, config_maps, expand, find, pod_template, render
from components.deploy.pods.probes import PodNotReady, ProbeResult
from components.deploy.pods.trainjob import trainjob_pods

__all__ = [
    "DEFAULT_NETWORK", "ExecResult", "Pod", "PodError", "PodNotReady", "ProbeResult", "attach", "config_maps",
    "docker_client", "ensure_network", "expand", "find", "list_pods", "pod_template", "render", "start_pod",
    "trainjob_pods",
]
