"""The few Kubernetes API calls the deploy step makes, through the official client (plain JSON in and out).

Every call, and what it needs in manifests/base/pipeline-role.yaml (all in the namespace):

* GET the Deployment (read it; the rollout wait polls it): ``get`` on that name.
* PATCH it: the server-side apply of the release fields, the rollback's and the scale
  to/from zero's JSON patches: ``patch`` on that name. The apply only ever updates the
  Deployment the manifests created: the step never creates one (no ``create`` is granted,
  so an apply that would create it is refused, and the step says to apply the manifests).
* LIST ReplicaSets and Pods by label (the previous revision; the new pods' problems):
  ``list``, which RBAC cannot narrow to names (theirs are generated).
* GET the Service and the storage ConfigMap: ``get`` on those names.
* Shadow and canary rollouts (``staged``): the same calls on the challenger Deployment and its Service, and
  GET and JSON-PATCH of the rollout ConfigMap (``get``, ``patch`` on that name).
"""

from __future__ import annotations

import json
from typing import Any

from components.deploy.kubernetes.release import DeployError

FIELD_MANAGER = "kfp-mlops"  # server-side apply of the release fields
ROLLBACK_FIELD_MANAGER = "kfp-mlops-rollback"  # JSON patches: rollback, scale to/from zero


def api_exception_type() -> type[Exception]:
    """``kubernetes.client.exceptions.ApiException``, imported only once the cluster is used."""
    from kubernetes.client.exceptions import ApiException

    return ApiException


def api_error(err: Exception) -> str:
    """One line from an ApiException: HTTP status and the API server's own message."""
    status = getattr(err, "status", None)
    body = getattr(err, "body", None)
    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError):
        message = None
    text = message or (body.decode(errors="replace") if isinstance(body, bytes) else body) or getattr(err, "reason", "") or str(err)
    return f"HTTP {status}: {str(text).strip()[:500]}" if status else str(text).strip()[:500]


class KubernetesApi:
    """The deploy step's calls, through the official client's ``ApiClient`` (JSON dicts in and out).

    Raises ``kubernetes.client.exceptions.ApiException`` for every non-2xx answer.
    """

    def __init__(self, api_client=None):
        from kubernetes import client

        self.client = api_client or client.ApiClient()

    @classmethod
    def from_environment(cls) -> "KubernetesApi":
        """In a pod: its service account; elsewhere: the current kubeconfig context."""
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as err:
                raise DeployError(f"no Kubernetes credentials: not in a pod with a service account token, and no "
                                  f"usable kubeconfig ({err}). Run the step in the cluster (service account "
                                  "kfp-mlops-pipeline) or set KUBECONFIG.") from None
        return cls()

    def _call(self, method: str, path: str, query: list[tuple[str, str]] | None = None, body: Any = None,
              content_type: str = "application/json") -> dict:
        return self.client.call_api(
            path, method, {}, query or [], {"Accept": "application/json", "Content-Type": content_type},
            body=body, response_type="object", auth_settings=["BearerToken"], _return_http_data_only=True,
            _preload_content=True, _request_timeout=30,
        )

    def get_deployment(self, namespace: str, name: str) -> dict:
        return self._call("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")

    def apply_deployment(self, namespace: str, name: str, body: dict) -> dict:
        return self._call("PATCH", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
                          [("fieldManager", FIELD_MANAGER), ("force", "true")], body, "application/apply-patch+yaml")

    def json_patch_deployment(self, namespace: str, name: str, ops: list[dict]) -> dict:
        return self._call("PATCH", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
                          [("fieldManager", ROLLBACK_FIELD_MANAGER)], ops, "application/json-patch+json")

    def list_replicasets(self, namespace: str, selector: str) -> list[dict]:
        return self._call("GET", f"/apis/apps/v1/namespaces/{namespace}/replicasets",
                          [("labelSelector", selector)])["items"]

    def list_pods(self, namespace: str, selector: str) -> list[dict]:
        return self._call("GET", f"/api/v1/namespaces/{namespace}/pods", [("labelSelector", selector)])["items"]

    def get_service(self, namespace: str, name: str) -> dict:
        return self._call("GET", f"/api/v1/namespaces/{namespace}/services/{name}")

    def get_configmap(self, namespace: str, name: str) -> dict:
        return self._call("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    def json_patch_configmap(self, namespace: str, name: str, ops: list[dict]) -> dict:
        return self._call("PATCH", f"/api/v1/namespaces/{namespace}/configmaps/{name}",
                          [("fieldManager", FIELD_MANAGER)], ops, "application/json-patch+json")
