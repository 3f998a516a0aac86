"""The manifests of shadow and canary rollouts: the challenger Deployment beside the stable one (one pod spec,
derived twice the same way: by kustomize, and by the deploy step from the live stable Deployment), its Service,
the rollout ConfigMaps, and who may reach whom. The rendering, schema, checkov and restricted-pod-security checks
of every object, these included, are tests/test_manifests.py's."""

from __future__ import annotations

import copy

import pytest
from test_manifests import (
    API_SERVER,
    CLIENT,
    DNS,
    INTERNET,
    MINIO,
    NAMESPACES,
    PROMETHEUS,
    TARGETS,
    Peer,
    _network_policies,
    _pod_labels,
    connects,
    find,
    pod_spec,
    render,
)

from components.core import names
from components.deploy.kubernetes.challenger import render_challenger, rollout_volume
from components.deploy.kubernetes.release import FETCH_CONTAINER, Release

STABLE, CHALLENGER = names.SERVING_DEPLOYMENT, names.SERVING_CHALLENGER


def comparable(spec: dict, selector: dict, rollout_config_map: str) -> dict:
    """A serving pod spec with the two things that differ between the stable and the challenger pods put back to
    the stable ones: the pods its topology spread counts and the ConfigMap of its rollout file."""
    spec = copy.deepcopy(spec)
    for constraint in spec.get("topologySpreadConstraints", []):
        constraint["labelSelector"]["matchLabels"] = dict(selector)
    rollout_volume(spec)["configMap"]["name"] = rollout_config_map
    return spec


@pytest.mark.parametrize("target", TARGETS)
def test_the_challenger_runs_the_stable_pod_spec_in_every_overlay(target):
    stable, challenger = find(target, "Deployment", STABLE), find(target, "Deployment", CHALLENGER)
    stable_selector = stable["spec"]["selector"]["matchLabels"]
    selector = challenger["spec"]["selector"]["matchLabels"]
    assert comparable(pod_spec(challenger), stable_selector, names.ROLLOUT_CONFIG_MAP) == pod_spec(stable), \
        f"{target}: the challenger's pod spec differs from the stable one's beyond its own labels and rollout file"
    for constraint in pod_spec(challenger)["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"] == selector, "it spreads its own pods"
    assert rollout_volume(pod_spec(challenger))["configMap"]["name"] == names.CHALLENGER_ROLLOUT_CONFIG_MAP
    assert rollout_volume(pod_spec(stable))["configMap"]["name"] == names.ROLLOUT_CONFIG_MAP
    assert challenger["spec"]["template"]["metadata"]["annotations"] == stable["spec"]["template"]["metadata"]["annotations"]

    # Its own pods: not the stable Service's, HPA's or PDB's; nothing runs between rollouts.
    assert challenger["spec"]["replicas"] == 0 and "replicas" not in stable["spec"]
    assert selector.items() <= challenger["spec"]["template"]["metadata"]["labels"].items()
    assert selector != stable_selector and selector["app.kubernetes.io/component"] == "challenger"
    labels = challenger["spec"]["template"]["metadata"]["labels"]
    for kind, path in (("Service", ("spec", "selector")), ("PodDisruptionBudget", ("spec", "selector", "matchLabels"))):
        stable_selects = find(target, kind, STABLE)
        for key in path:
            stable_selects = stable_selects[key]
        assert not stable_selects.items() <= labels.items(), f"the stable {kind} would take the challenger's pods"
    assert find(target, "HorizontalPodAutoscaler", STABLE)["spec"]["scaleTargetRef"]["name"] == STABLE
    service = find(target, "Service", CHALLENGER)
    assert service["spec"]["selector"] == selector and service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == find(target, "Service", STABLE)["spec"]["ports"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_deploy_step_derives_the_challenger_as_kustomize_does(target):
    """render_challenger (what the step applies, from the live stable Deployment) and kustomize's replacements
    (what the manifests hold) give one pod spec, but for the release fields the step sets."""
    stable, challenger = find(target, "Deployment", STABLE), find(target, "Deployment", CHALLENGER)
    release = Release("digits", "c0ffee123456", "7a1f" * 16, "s3://kfp-mlops/models/digits", run_id="r1",
                      namespace=NAMESPACES[target], deployment_name=CHALLENGER)
    applied = render_challenger(stable, challenger, release, replicas=1)
    spec = applied["spec"]["template"]["spec"]
    fetch = next(c for c in spec["initContainers"] if c["name"] == FETCH_CONTAINER)
    env = {e["name"]: e.get("value") for e in fetch["env"]}
    assert (env[names.MODEL_URI_ENV], env[names.MODEL_VERSION_ENV]) == (release.model_uri, release.release_id)
    expected = copy.deepcopy(pod_spec(challenger))
    expected_fetch = next(c for c in expected["initContainers"] if c["name"] == FETCH_CONTAINER)
    for e in expected_fetch["env"]:
        if e["name"] in (names.MODEL_URI_ENV, names.MODEL_VERSION_ENV):
            e["value"] = env[e["name"]]
    assert spec == expected
    assert applied["spec"]["replicas"] == 1 and applied["spec"]["selector"] == challenger["spec"]["selector"]
    assert applied["spec"]["template"]["metadata"]["labels"][names.MODEL_VERSION_LABEL] == "c0ffee123456"


def test_the_rollout_files_are_empty_and_mounted_where_the_proxy_reads_them():
    from serving.auth_proxy import build_parser
    from serving.rollout_router import parse_rollout

    for name in (names.ROLLOUT_CONFIG_MAP, names.CHALLENGER_ROLLOUT_CONFIG_MAP):
        data = find("base", "ConfigMap", name)["data"]
        assert data == {names.ROLLOUT_FILE_KEY: "{}"} and parse_rollout({}, name) is None, "no challenger"
    for deployment, config_map in ((STABLE, names.ROLLOUT_CONFIG_MAP), (CHALLENGER, names.CHALLENGER_ROLLOUT_CONFIG_MAP)):
        spec = pod_spec(find("base", "Deployment", deployment))
        proxy = next(c for c in spec["containers"] if c["name"] == "auth-proxy")
        args = build_parser().parse_args(proxy["command"][3:])
        assert args.rollout_file == names.PROXY_ROLLOUT_FILE
        mount = next(m for m in proxy["volumeMounts"] if m["mountPath"] == names.PROXY_ROLLOUT_FILE.rsplit("/", 1)[0])
        assert mount["readOnly"] is True and "subPath" not in mount, "a directory mount: the kubelet updates it"
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == config_map
        other = [c["name"] for c in spec["containers"] + spec["initContainers"]
                 if any(m["name"] == mount["name"] for m in c.get("volumeMounts", []))]
        assert other == ["auth-proxy"], "only the proxy reads it"


@pytest.mark.parametrize("target", TARGETS)
def test_who_may_reach_the_challenger(target):
    ns, policies = NAMESPACES[target], _network_policies(target)
    stable = Peer.pod(ns, **_pod_labels(target, "Deployment", STABLE))
    challenger = Peer.pod(ns, **_pod_labels(target, "Deployment", CHALLENGER))
    step = {"workflows.argoproj.io/workflow": "kfp-mlops-x7k2p", "pipelines.kubeflow.org/v2_component": "true"}
    deploy = Peer.pod(ns, **step, **{names.INFERENCE_CLIENT_LABEL: "true"})
    other_step = Peer.pod(ns, **step)
    labelled_here = Peer.pod(ns, **{names.INFERENCE_CLIENT_LABEL: "true"})
    # In: the stable pods' proxies (mirror, canary share) and the deploy step (smoke test); Prometheus to metrics.
    assert connects(policies, stable, challenger, 8080)
    assert connects(policies, deploy, challenger, 8080)
    assert connects(policies, PROMETHEUS, challenger, 8082)
    for source in (CLIENT, other_step, labelled_here, INTERNET):
        assert not connects(policies, source, challenger, 8080), f"{source} -> challenger"
    assert not connects(policies, stable, challenger, 8079) and not connects(policies, deploy, challenger, 8082)
    # The deploy step reads GET /rollout on the stable pods' proxy port.
    assert connects(policies, deploy, stable, 8080)
    # Out: as the stable pods, DNS and the object store only; never back to the stable pods or the API server.
    assert connects(policies, challenger, DNS, 53, "UDP") and connects(policies, challenger, MINIO, 9000)
    for dest, port in ((stable, 8080), (API_SERVER, 443), (INTERNET, 443), (CLIENT, 8080)):
        assert not connects(policies, challenger, dest, port), f"challenger -> {dest} :{port}"
    # The stable pods gain the challenger, nothing else.
    assert not connects(policies, stable, CLIENT, 8080) and not connects(policies, stable, INTERNET, 443)


def test_the_names_the_rollout_code_uses_are_the_manifests():
    objects = render("base")
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Deployment", CHALLENGER), ("Service", CHALLENGER), ("ConfigMap", names.ROLLOUT_CONFIG_MAP),
            ("ConfigMap", names.CHALLENGER_ROLLOUT_CONFIG_MAP)} <= kinds
    role = find("base", "Role", names.PIPELINE_SERVICE_ACCOUNT)
    granted = {(r["resources"][0], n, v) for r in role["rules"] for n in r.get("resourceNames", []) for v in r["verbs"]}
    assert {("deployments", CHALLENGER, "get"), ("deployments", CHALLENGER, "patch"), ("services", CHALLENGER, "get"),
            ("configmaps", names.ROLLOUT_CONFIG_MAP, "get"), ("configmaps", names.ROLLOUT_CONFIG_MAP, "patch")} <= granted
    assert not any(n == names.CHALLENGER_ROLLOUT_CONFIG_MAP for _, n, _ in granted), "nobody writes the challenger's"
