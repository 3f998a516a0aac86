"""The connection to a Kubeflow Pipelines API (``kfp.Client``, API v2beta1): host, token, namespace.

    conn = resolve_connection(cfg.cluster, host="http://localhost:8888")   # --kfp-host/--token/--namespace
    client = connect(conn)                       # checks the API answers, then a kfp.Client

Every call goes through ``api_call``: the errors of ``kfp.Client`` and
``kfp_server_api`` become a :class:`ClusterError` whose message says what is wrong
and what to do (wrong host, rejected token, missing namespace).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.config import ClusterConfig

IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
KFP_SYSTEM_NAMESPACE = "kubeflow"  # where KFP itself runs: the kubeconfig route goes to its service
TOKEN_ENV = "KFP_TOKEN"
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # the variable kfp's own in-cluster credentials read
# In a pod: KFP's audience-bound projected token (multi-user Kubeflow), else the pod's ServiceAccount token.
IN_CLUSTER_TOKEN_FILES = ("/var/run/secrets/kubeflow/pipelines/token",
                          "/var/run/secrets/kubernetes.io/serviceaccount/token")
KUBE_PROXY_PATH = f"api/v1/namespaces/{KFP_SYSTEM_NAMESPACE}/services/ml-pipeline:http/proxy"
REQUEST_TIMEOUT = (10, 60)  # (connect, read) seconds for the first request; kfp's own default waits forever


class ClusterError(RuntimeError):
    """A cluster call failed; the message says what to do. ``status``: the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Connection:
    """Where the KFP API is and how to authenticate (no secret is printed by ``describe``)."""

    host: str | None  # None = through the Kubernetes API server with the kubeconfig (kube_context)
    namespace: str  # user/profile namespace; dropped on single-user KFP
    token: str | None = None
    token_file: str | None = None  # re-read on every request: projected tokens rotate
    kube_context: str | None = None
    multi_user: bool | None = None  # learnt from the healthz answer on connect

    def describe(self) -> str:
        where = self.host or f"the Kubernetes API server of kube context {self.kube_context or '(current)'}"
        auth = ("token from --token/KFP_TOKEN" if self.token else f"token file {self.token_file}" if self.token_file
                else "kubeconfig credentials" if self.host is None else "no token")
        return f"{where} ({auth})"


def resolve_connection(cluster: ClusterConfig, *, host: str | None = None, token: str | None = None,
                       namespace: str | None = None, kube_context: str | None = None,
                       environ: dict[str, str] | None = None) -> Connection:
    """Pick host, token and namespace from flags, then config, then the environment.

    Host: ``host``, else the kubeconfig route when ``kube_context`` is given, else
    ``cluster.kfp_host``, else the in-cluster service when running in a pod
    (``KUBERNETES_SERVICE_HOST`` set). Token: ``token``, else ``$KFP_TOKEN``, else the
    file in ``$KF_PIPELINES_SA_TOKEN_PATH``, else (in a pod) KFP's projected token or
    the ServiceAccount token.
    """
    env = os.environ if environ is None else environ
    in_cluster = bool(env.get("KUBERNETES_SERVICE_HOST"))
    if host and kube_context:
        raise ClusterError("pass either --kfp-host or --kube-context, not both")
    host = host or (None if kube_context else cluster.kfp_host) or None  # an explicit --kube-context beats the config
    if host is None and kube_context is None:
        if not in_cluster:
            raise ClusterError(
                "no Kubeflow Pipelines host: pass --kfp-host URL (e.g. http://localhost:8888 after "
                "'kubectl -n kubeflow port-forward svc/ml-pipeline 8888:8888'), set cluster.kfp_host in the config, "
                "or pass --kube-context NAME to go through the Kubernetes API server with your kubeconfig; "
                f"inside the cluster the default is {IN_CLUSTER_HOST}")
        host = IN_CLUSTER_HOST
    if host is not None:
        if not re.match(r"^https?://[^/\s]+", host):
            raise ClusterError(f"--kfp-host {host!r} must be an http:// or https:// URL, e.g. http://localhost:8888")
        host = host.rstrip("/")

    token = token or env.get(TOKEN_ENV) or None
    token_file = None
    if token is None and kube_context is None:
        if env.get(TOKEN_PATH_ENV):
            token_file = env[TOKEN_PATH_ENV]
            if not Path(token_file).is_file():
                raise ClusterError(f"{TOKEN_PATH_ENV}={token_file} but that file does not exist; "
                                   "mount the projected ServiceAccount token there or unset the variable")
        elif in_cluster:
            token_file = next((f for f in IN_CLUSTER_TOKEN_FILES if Path(f).is_file()), None)
    ns = cluster.namespace if namespace is None else namespace
    return Connection(host=host, namespace=ns, token=token, token_file=token_file, kube_context=kube_context)


class KubeconfigCredentials:
    """The bearer token of a kubeconfig context, for the route through the Kubernetes API server.

    A ``kfp.client.TokenCredentialsBase`` (registered below): kfp calls the hook before
    each request, and the kubernetes loader behind it re-runs an exec plugin (EKS, GKE,
    OIDC) only when its token expired. Not kfp's own kubeconfig route: its token
    refresh resets the host and drops the service-proxy path.
    """

    def __init__(self, kube_context: str | None):
        import kfp_server_api
        from kubernetes import config as k8s_config

        self.kube_context = kube_context
        self._loaded = kfp_server_api.Configuration()
        try:
            k8s_config.load_kube_config(context=kube_context, client_configuration=self._loaded)
        except Exception as exc:  # the kubernetes loader raises many kinds; all mean "fix the kubeconfig"
            raise ClusterError(f"cannot use the kubeconfig (context {kube_context or 'current'}): {exc}; "
                               "check KUBECONFIG / ~/.kube/config, or pass --kfp-host instead") from None
        if self._loaded.cert_file or not self._loaded.api_key.get("authorization"):
            raise ClusterError(f"kube context {kube_context or '(current)'} authenticates with a client certificate, "
                               "which this route does not support; use 'kubectl -n kubeflow port-forward "
                               "svc/ml-pipeline 8888:8888' and --kfp-host http://localhost:8888")
        self.api_server = self._loaded.host.rstrip("/")
        self.ssl_ca_cert = self._loaded.ssl_ca_cert
        self.verify_ssl = self._loaded.verify_ssl

    @property
    def proxied_host(self) -> str:
        return f"{self.api_server}/{KUBE_PROXY_PATH}"

    def token(self) -> str:
        if self._loaded.refresh_api_key_hook is not None:
            self._loaded.refresh_api_key_hook(self._loaded)  # reloads only an expired token
        value = self._loaded.api_key["authorization"]
        return value[len("Bearer "):] if value.startswith("Bearer ") else value

    def refresh_api_key_hook(self, config) -> None:
        config.api_key["authorization"] = self.token()


def _register_credentials() -> None:
    from kfp.client.token_credentials_base import TokenCredentialsBase

    TokenCredentialsBase.register(KubeconfigCredentials)


def _api_configuration(conn: Connection, kube: KubeconfigCredentials | None):
    """A kfp_server_api Configuration for a first, bounded request (healthz)."""
    import kfp_server_api

    config = kfp_server_api.Configuration()
    config.api_key_prefix["authorization"] = "Bearer"
    if kube is not None:
        config.host = kube.proxied_host
        config.ssl_ca_cert, config.verify_ssl = kube.ssl_ca_cert, kube.verify_ssl
        config.api_key["authorization"] = kube.token()
    else:
        config.host = conn.host
        token = conn.token or (Path(conn.token_file).read_text().strip() if conn.token_file else None)
        if token:
            config.api_key["authorization"] = token
    config.retries = 1  # one quick reconnect, not urllib3's three
    return config


def connect(conn: Connection):
    """Check the API answers (bounded, clear errors), then return a ``kfp.Client``.

    Sets ``conn.multi_user`` from the server: multi-user KFP needs a namespace, and
    single-user KFP rejects one on some calls, so the namespace is dropped there.
    """
    import kfp
    import kfp_server_api

    kube = KubeconfigCredentials(conn.kube_context) if conn.host is None else None
    api_client = kfp_server_api.ApiClient(_api_configuration(conn, kube))
    where = conn.describe()
    healthz = api_call(where, "health check", kfp_server_api.HealthzServiceApi(api_client).healthz_service_get_healthz,
                       _request_timeout=REQUEST_TIMEOUT)
    conn.multi_user = bool(healthz.multi_user)
    if conn.multi_user and not conn.namespace:
        raise ClusterError(f"Kubeflow Pipelines at {where} is multi-user: pass --namespace (your profile "
                           "namespace) or set cluster.namespace")
    if not conn.multi_user:
        conn.namespace = ""

    # A namespace other than "kubeflow" also keeps kfp.Client from a second health check
    # (with 5 s sleeps between retries) in its constructor.
    kwargs: dict[str, Any] = {"namespace": conn.namespace or KFP_SYSTEM_NAMESPACE}
    if kube is not None:
        _register_credentials()
        kwargs.update(host=kube.proxied_host, credentials=kube, ssl_ca_cert=kube.ssl_ca_cert,
                      verify_ssl=kube.verify_ssl)
    else:
        kwargs["host"] = conn.host
        if conn.token:
            kwargs["existing_token"] = conn.token
        elif conn.token_file:
            from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

            kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(conn.token_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        client = api_call(where, "connect", kfp.Client, **kwargs)
    # kfp.Client falls back to the namespace in ~/.config/kfp/context.json; use exactly ours.
    client._context_setting["namespace"] = conn.namespace
    return client


def api_call(where: str, what: str, fn: Callable, *args, **kwargs):
    """Run one API call; turn transport and HTTP errors into ClusterError with a hint."""
    import kfp_server_api
    import urllib3

    try:
        return fn(*args, **kwargs)
    except kfp_server_api.ApiException as exc:
        raise ClusterError(_http_error_message(where, what, exc), status=exc.status) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ClusterError(f"cannot reach Kubeflow Pipelines at {where} ({what}): {reason}. Check --kfp-host "
                           "(is the port-forward running? is it the ml-pipeline API, port 8888?)") from None


def _http_error_message(where: str, what: str, exc) -> str:
    status = exc.status
    detail = ""
    if exc.body:
        try:
            body = json.loads(exc.body)
            detail = body.get("message") or body.get("error") or ""
        except (ValueError, AttributeError):
            detail = str(exc.body)[:300]
    detail = f": {detail}" if detail else ""
    if status == 401:
        return (f"Kubeflow Pipelines at {where} rejected the credentials ({what}: 401 Unauthorized{detail}). "
                f"The token is missing, expired or wrong: pass a fresh one with --token or ${TOKEN_ENV}.")
    if status == 403:
        return (f"Kubeflow Pipelines at {where} refused {what} (403 Forbidden{detail}). The token is valid but "
                "may not act in this namespace: check --namespace and that you are a contributor of that profile.")
    if status == 404 and what in ("health check", "connect"):
        return (f"no Kubeflow Pipelines API at {where} (404 on /apis/v2beta1/healthz): point --kfp-host at the "
                "ml-pipeline service (port 8888) or the UI's /pipeline path.")
    return f"Kubeflow Pipelines at {where}: {what} failed ({status} {exc.reason}{detail})"


def request_namespace(conn: Connection) -> str | None:
    """The namespace argument of a list or create call: None on single-user KFP."""
    return conn.namespace or None


def equals_filter(key: str, value: str) -> str:
    """An API list filter: ``key`` equals ``value``."""
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})
