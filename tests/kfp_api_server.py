"""A loopback stand-in for the Kubeflow Pipelines API (v2beta1) that validates what it is sent.

No KFP server runs here, so ``pipelines/cluster/`` is tested against this one.
It is fake in what it stores (dicts in memory, runs that move PENDING → RUNNING →
SUCCEEDED over successive GETs) but strict in what it accepts, so a request the
real API would reject (or silently misread) fails the test instead:

* every JSON body is checked against the ``kfp_server_api`` v2beta1 model of its
  endpoint: unknown keys, wrong types, enum values outside the model's allowed
  values, and client-set output-only fields (ids, timestamps, states) are 400s;
  then it is deserialised into that model (``V2beta1Run``, ``V2beta1RecurringRun``…);
* the endpoint's required fields and rules, as the API server enforces them: a run
  names its experiment and exactly one pipeline source, its parameters exist in the
  pipeline version's spec with the right types; a recurring run has a trigger, a
  cron robfig/cron accepts, max concurrency 1-10; names are unique; multi-user mode
  needs a namespace, single-user mode refuses one on list recurring runs;
* unknown query parameters are 400s; filters are parsed as the v2beta1 Filter;
* an uploaded pipeline (multipart ``uploadfile``) must parse strictly as a
  ``PipelineSpec`` proto, its platform part as ``PlatformSpec`` with every executor
  a ``KubernetesExecutorConfig``, and load with ``kfp.components``;
* every request needs ``Authorization: Bearer <token>`` (401 otherwise), as behind
  Kubeflow's auth proxy; every response is itself checked against its model.

Requests are recorded (``server.requests``) for the tests to assert on. The
Kubernetes API server's service-proxy prefix (the kubeconfig route) is stripped.
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kfp_server_api
import yaml
from google.protobuf import json_format

PROXY_PREFIX = "/api/v1/namespaces/kubeflow/services/ml-pipeline:http/proxy"
API = "/apis/v2beta1"
# Fields a client never sets on create; the server fills them in.
OUTPUT_ONLY = {
    "V2beta1Run": {"run_id", "created_at", "scheduled_at", "finished_at", "state", "error", "run_details",
                   "state_history", "recurring_run_id", "storage_state", "plugins_output"},
    "V2beta1RecurringRun": {"recurring_run_id", "created_at", "updated_at", "status", "error"},
    "V2beta1Experiment": {"experiment_id", "created_at", "storage_state", "last_run_created_at"},
}
# int64 fields the generated models type as 'str'; protojson accepts a number or a numeric string.
INT64_AS_STR = {("V2beta1RecurringRun", "max_concurrency"), ("V2beta1PeriodicSchedule", "interval_second")}
# Parameter types of the pipeline spec -> the JSON values that fit them.
PARAMETER_TYPES = {
    "STRING": (str,), "NUMBER_INTEGER": (int,), "NUMBER_DOUBLE": (int, float), "BOOLEAN": (bool,),
    "LIST": (list,), "STRUCT": (dict,),
}
GRPC = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------------------
# Strict validation against the kfp_server_api models
# ---------------------------------------------------------------------------

def _model(name: str):
    return getattr(kfp_server_api.models, name)


def _is_enum(cls) -> bool:
    return hasattr(cls, "allowable_values") and not cls.openapi_types


def check_against_model(data: Any, type_name: str, where: str, problems: list[str]) -> None:
    """Append every way ``data`` (decoded JSON) does not fit the openapi type ``type_name``."""
    if data is None:
        return  # protojson: null = unset
    if type_name.startswith("list["):
        if not isinstance(data, list):
            problems.append(f"{where}: expected a list, got {type(data).__name__}")
            return
        for i, item in enumerate(data):
            check_against_model(item, type_name[5:-1], f"{where}[{i}]", problems)
        return
    if type_name.startswith("dict("):
        if not isinstance(data, dict):
            problems.append(f"{where}: expected an object, got {type(data).__name__}")
            return
        value_type = re.match(r"dict\(([^,]*), (.*)\)", type_name).group(2)
        for key, value in data.items():
            check_against_model(value, value_type, f"{where}.{key}", problems)
        return
    simple = {"str": str, "bool": bool, "float": (int, float), "int": int, "object": object}
    if type_name in simple:
        if not isinstance(data, simple[type_name]) or (type_name in ("int", "float") and isinstance(data, bool)):
            problems.append(f"{where}: expected {type_name}, got {type(data).__name__} {data!r}")
        return
    if type_name in ("datetime", "date"):
        if not isinstance(data, str):
            problems.append(f"{where}: expected an RFC 3339 string, got {data!r}")
            return
        try:
            dt.datetime.fromisoformat(data.replace("Z", "+00:00"))
        except ValueError:
            problems.append(f"{where}: {data!r} is not an RFC 3339 time")
        return
    cls = _model(type_name)
    if _is_enum(cls):
        # protojson takes an enum's name or its number (kfp's filters send EQUALS as 1)
        if isinstance(data, int) and not isinstance(data, bool) and 0 <= data < len(cls.allowable_values):
            return
        if data not in cls.allowable_values:
            problems.append(f"{where}: {data!r} is not one of {cls.allowable_values}")
        return
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a {type_name} object, got {type(data).__name__}")
        return
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    for key, value in data.items():
        if key not in by_json:
            problems.append(f"{where}: unknown field {key!r} for {type_name} (known: {sorted(by_json)})")
            continue
        attr = by_json[key]
        if (type_name, attr) in INT64_AS_STR:
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())):
                problems.append(f"{where}.{key}: expected an int64, got {value!r}")
            continue
        check_against_model(value, cls.openapi_types[attr], f"{where}.{key}", problems)


_DESERIALIZER = kfp_server_api.ApiClient()


def parse_body(raw: bytes, type_name: str, where: str, *, create: bool = True):
    """Decode, validate strictly, and deserialise a request body into its model."""
    try:
        data = json.loads(raw or b"null")
    except ValueError as exc:
        raise ApiError(400, f"{where}: body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"{where}: body must be a JSON object")
    problems: list[str] = []
    check_against_model(data, type_name, where, problems)
    if create:
        set_outputs = sorted(k for k in data if k in OUTPUT_ONLY.get(type_name, ()) and data[k] is not None)
        if set_outputs:
            problems.append(f"{where}: output-only field(s) {set_outputs} must not be set by the client")
    if problems:
        raise ApiError(400, "invalid request: " + "; ".join(problems))
    try:
        obj = _DESERIALIZER._ApiClient__deserialize(data, type_name)
    except (ValueError, TypeError) as exc:
        raise ApiError(400, f"{where}: does not deserialise into {type_name}: {exc}") from None
    return data, obj


def check_response(data: dict, type_name: str) -> dict:
    problems: list[str] = []
    check_against_model(data, type_name, "response", problems)
    if problems:  # a bug in this fake, not in the client
        raise AssertionError(f"fake KFP answered an invalid {type_name}: {problems}")
    return data


# ---------------------------------------------------------------------------
# robfig/cron v1 as KFP's API server parses it: 5 or 6 fields (day of week optional), descriptors
# ---------------------------------------------------------------------------

_CRON_BOUNDS = [(0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]
_CRON_NAMES = [{}, {}, {}, {}, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
               {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}]


def robfig_parse(spec: str) -> None:
    if spec.startswith("@"):
        if spec in ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly") or spec.startswith("@every "):
            return
        raise ValueError(f"unrecognized descriptor: {spec}")
    fields = spec.split()
    if not 5 <= len(fields) <= 6:
        raise ValueError(f"expected 5 to 6 fields, found {len(fields)}: {spec}")
    for value, (low, high), names in zip(fields, _CRON_BOUNDS, _CRON_NAMES):
        for part in value.split(","):
            rng, _, step = part.partition("/")
            if step and not step.isdigit():
                raise ValueError(f"bad step {step!r}")
            if rng in ("*", "?"):
                continue
            for bound in rng.split("-"):
                number = names.get(bound.lower(), int(bound) if bound.isdigit() else None)
                if number is None or not low <= number <= high:
                    raise ValueError(f"value {bound!r} out of range [{low}, {high}]")


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    body: Any = None  # decoded JSON, or {field: {"filename", "content"}} for multipart
    authorization: str | None = None
    via_proxy: bool = False


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class FakeKfpApi:
    token: str | None = "good-token"
    multi_user: bool = True
    # States a run reports on its 1st, 2nd, ... GET; the last repeats.
    run_states: list[str] = field(default_factory=lambda: ["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"])
    # Task name -> state a SUCCEEDED run reports in run_details (KFP skips deploy when a gate returns false).
    succeeded_tasks: dict[str, str] = field(default_factory=lambda: dict.fromkeys(
        ("ingest", "pretrain", "finetune", "evaluate", "privacy", "robustness", "record", "deploy", "monitor"),
        "SUCCEEDED"))
    requests: list[Recorded] = field(default_factory=list)
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, dict] = field(default_factory=dict)
    specs: dict[str, dict] = field(default_factory=dict)  # version id -> pipeline spec
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring_runs: dict[str, dict] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # internal errors of the fake (tests assert it stays empty)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._run_gets: dict[str, int] = {}
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "FakeKfpApi":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                fake._dispatch(self)

            do_GET = do_POST = do_DELETE = do_PATCH = _handle

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def calls(self, method: str, pattern: str) -> list[Recorded]:
        """Recorded requests whose method matches and path matches the regex (after /apis/v2beta1)."""
        return [r for r in self.requests if r.method == method and re.fullmatch(API + pattern, r.path)]

    # -- plumbing ----------------------------------------------------------
    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        path, via_proxy = parts.path, False
        if path.startswith(PROXY_PREFIX):
            path, via_proxy = "/" + path[len(PROXY_PREFIX):].lstrip("/"), True
        query_lists = parse_qs(parts.query, keep_blank_values=True)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        record = Recorded(h.command, path, {k: v[-1] for k, v in query_lists.items()},
                          authorization=h.headers.get("Authorization"), via_proxy=via_proxy)
        with self._lock:
            self.requests.append(record)
        try:
            if any(len(v) > 1 for v in query_lists.values()):
                raise ApiError(400, f"repeated query parameter(s) in {parts.query}")
            if self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
                got = "no Authorization header" if not h.headers.get("Authorization") else "a token that is not valid"
                raise ApiError(401, f"Unauthenticated: request has {got}")
            status, body = self._route(h.command, path, record, raw, h.headers.get("Content-Type", ""))
        except ApiError as exc:
            status, body = exc.status, check_response(
                {"code": GRPC.get(exc.status, 2), "message": exc.message, "details": []}, "GoogleRpcStatus")
        except Exception as exc:  # a bug in this fake: answer 500 and keep it for the test to see
            self.errors.append(f"{type(exc).__name__}: {exc}")
            status, body = 500, {"code": 13, "message": f"fake KFP bug: {exc}", "details": []}
        payload = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def _route(self, method: str, path: str, rec: Recorded, raw: bytes, content_type: str):
        routes = [
            ("GET", r"/healthz", self._healthz),
            ("POST", r"/pipelines/upload", self._upload),
            ("POST", r"/pipelines/upload_version", self._upload_version),
            ("GET", r"/pipelines", self._list_pipelines),
            ("GET", r"/pipelines/(?P<pid>[^/]+)/versions", self._list_versions),
            ("GET", r"/pipelines/(?P<pid>[^/]+)/versions/(?P<vid>[^/]+)", self._get_version),
            ("POST", r"/experiments", self._create_experiment),
            ("GET", r"/experiments", self._list_experiments),
            ("GET", r"/experiments/(?P<eid>[^/:]+)", self._get_experiment),
            ("POST", r"/runs", self._create_run),
            ("GET", r"/runs/(?P<rid>[^/:]+)", self._get_run),
            ("POST", r"/recurringruns", self._create_recurring_run),
            ("GET", r"/recurringruns", self._list_recurring_runs),
            ("GET", r"/recurringruns/(?P<rrid>[^/:]+)", self._get_recurring_run),
            ("POST", r"/recurringruns/(?P<rrid>[^/:]+):enable", self._enable),
            ("POST", r"/recurringruns/(?P<rrid>[^/:]+):disable", self._disable),
            ("DELETE", r"/recurringruns/(?P<rrid>[^/:]+)", self._delete_recurring_run),
        ]
        for m, pattern, handler in routes:
            match = re.fullmatch(API + pattern, path)
            if match and m == method:
                with self._lock:
                    return handler(rec=rec, raw=raw, content_type=content_type, **match.groupdict())
        raise ApiError(404, f"Not Found: {method} {path}")

    @staticmethod
    def _query(rec: Recorded, allowed: set[str]) -> dict[str, str]:
        unknown = set(rec.query) - allowed
        if unknown:
            raise ApiError(400, f"unknown query parameter(s) {sorted(unknown)}; this endpoint takes {sorted(allowed)}")
        return rec.query

    @staticmethod
    def _no_body(raw: bytes) -> None:
        if raw.strip() not in (b"", b"{}"):
            raise ApiError(400, f"this endpoint takes no body, got {raw[:80]!r}")

    # -- lists: filter, sort, pages ------------------------------------------
    @staticmethod
    def _filter(query: dict[str, str]):
        text = query.get("filter")
        if not text:
            return lambda item: True
        try:
            data = json.loads(text)
        except ValueError:
            raise ApiError(400, f"filter is not JSON: {text!r}") from None
        # protojson accepts lowerCamelCase and the proto names; the model has the proto names.
        def snake(obj):
            if isinstance(obj, dict):
                return {re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k): snake(v) for k, v in obj.items()}
            return [snake(v) for v in obj] if isinstance(obj, list) else obj
        data = snake(data)
        problems: list[str] = []
        check_against_model(data, "V2beta1Filter", "filter", problems)
        if problems:
            raise ApiError(400, "invalid filter: " + "; ".join(problems))
        predicates = []
        operations = _model("V2beta1PredicateOperation").allowable_values
        for p in data.get("predicates") or []:
            if isinstance(p.get("operation"), int):
                p["operation"] = operations[p["operation"]]
            if p.get("operation") != "EQUALS" or p.get("key") not in ("display_name", "name") or "string_value" not in p:
                raise ApiError(400, f"fake KFP supports only EQUALS on display_name with a string value, got {p}")
            predicates.append(p["string_value"])
        return lambda item: all(item.get("display_name") == v for v in predicates)

    @staticmethod
    def _page(items: list[dict], query: dict[str, str], attr: str, type_name: str) -> dict:
        sort_by = query.get("sort_by") or "created_at"
        field_name, _, order = sort_by.partition(" ")
        if field_name not in ("created_at", "display_name", "name") or order not in ("", "desc", "asc"):
            raise ApiError(400, f"invalid sort_by {sort_by!r}")
        items = sorted(items, key=lambda i: (i.get(field_name) or "", i.get("_seq", 0)), reverse=order == "desc")
        size = int(query.get("page_size") or 20)
        start = int(query.get("page_token") or 0)
        page = [{k: v for k, v in i.items() if not k.startswith("_")} for i in items[start:start + size]]
        next_token = str(start + size) if start + size < len(items) else ""
        key = _model(type_name).attribute_map[attr]  # the JSON name ('recurringRuns' is camelCase in the proto)
        return check_response({key: page, "total_size": len(items), "next_page_token": next_token}, type_name)

    def _namespace(self, ns: str | None, what: str) -> str:
        if self.multi_user:
            if not ns:
                raise ApiError(400, f"Invalid input error: {what} needs a namespace in multi-user mode")
            return ns
        return ""  # single-user: ReplaceNamespace makes it empty

    def _seq(self) -> int:
        return len(self.requests)

    # -- endpoints ---------------------------------------------------------
    def _healthz(self, rec, raw, **_):
        self._query(rec, set())
        return 200, check_response({"multi_user": self.multi_user, "pipeline_store": "database"},
                                   "V2beta1GetHealthzResponse")

    def _read_upload(self, rec: Recorded, raw: bytes, content_type: str) -> dict:
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(400, f"upload must be multipart/form-data, got {content_type!r}")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        fields = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = {"filename": part.get_filename(), "content": part.get_payload(decode=True)}
        rec.body = fields
        if set(fields) != {"uploadfile"}:
            raise ApiError(400, f"upload takes exactly one form field 'uploadfile', got {sorted(fields)}")
        upload = fields["uploadfile"]
        if not upload["filename"] or not re.search(r"\.(ya?ml|json|zip|tar\.gz|tgz)$", upload["filename"]):
            raise ApiError(400, f"unexpected pipeline file name {upload['filename']!r} (.yaml, .yml, .json, .zip, .tar.gz)")
        return self._validate_pipeline_package(upload["content"])

    @staticmethod
    def _validate_pipeline_package(content: bytes) -> dict:
        from kfp import components
        from kfp.kubernetes import kubernetes_executor_config_pb2
        from kfp.pipeline_spec import pipeline_spec_pb2

        try:
            docs = [d for d in yaml.safe_load_all(content) if d is not None]
            json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())  # strict: unknown fields raise
            if len(docs) > 1:
                json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
                executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
                for executor in executors.values():
                    json_format.ParseDict(executor, kubernetes_executor_config_pb2.KubernetesExecutorConfig())
            components.load_component_from_text(content.decode())
        except Exception as exc:  # any parse failure is the client's bad package
            raise ApiError(400, f"Invalid pipeline spec: {type(exc).__name__}: {exc}") from None
        return docs[0]

    def _new_version(self, pipeline_id: str, name: str, description: str | None, spec: dict) -> dict:
        version_id = str(uuid.uuid4())
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": version_id, "display_name": name, "name": name,
                   "description": description or "", "created_at": _now(), "pipeline_spec": spec, "_seq": self._seq()}
        self.versions[version_id] = version
        self.specs[version_id] = spec
        return version

    def _upload(self, rec, raw, content_type, **_):
        q = self._query(rec, {"name", "display_name", "description", "namespace", "tags"})
        spec = self._read_upload(rec, raw, content_type)
        name = q.get("display_name") or q.get("name") or spec["pipelineInfo"]["name"]
        namespace = q.get("namespace", "") if self.multi_user else ""  # multi-user: "" = a shared pipeline
        if any(p["display_name"] == name and p["namespace"] == namespace for p in self.pipelines.values()):
            raise ApiError(409, f"Already exists: a pipeline named {name!r} exists in namespace {namespace!r}")
        pipeline_id = str(uuid.uuid4())
        pipeline = {"pipeline_id": pipeline_id, "display_name": name, "name": name,
                    "description": q.get("description", ""), "created_at": _now(), "namespace": namespace,
                    "_seq": self._seq()}
        self.pipelines[pipeline_id] = pipeline
        self._new_version(pipeline_id, name, q.get("description"), spec)  # the first version, named as the pipeline
        return 200, check_response({k: v for k, v in pipeline.items() if not k.startswith("_")}, "V2beta1Pipeline")

    def _upload_version(self, rec, raw, content_type, **_):
        q = self._query(rec, {"name", "display_name", "pipelineid", "description", "tags"})
        spec = self._read_upload(rec, raw, content_type)
        pipeline_id = q.get("pipelineid")
        if not pipeline_id or pipeline_id not in self.pipelines:
            raise ApiError(404, f"pipeline {pipeline_id!r} not found")
        name = q.get("display_name") or q.get("name")
        if not name:
            raise ApiError(400, "a pipeline version needs a name")
        if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name for v in self.versions.values()):
            raise ApiError(409, f"Already exists: pipeline {pipeline_id} has a version named {name!r}")
        version = self._new_version(pipeline_id, name, q.get("description"), spec)
        return 200, check_response({k: v for k, v in version.items() if not k.startswith("_")}, "V2beta1PipelineVersion")

    def _list_pipelines(self, rec, **_):
        q = self._query(rec, {"namespace", "page_token", "page_size", "sort_by", "filter"})
        namespace = q.get("namespace", "") if self.multi_user else ""
        keep = self._filter(q)
        items = [p for p in self.pipelines.values() if p["namespace"] == namespace and keep(p)]
        return 200, self._page(items, q, "pipelines", "V2beta1ListPipelinesResponse")

    def _list_versions(self, rec, pid, **_):
        q = self._query(rec, {"page_token", "page_size", "sort_by", "filter"})
        if pid not in self.pipelines:
            raise ApiError(404, f"pipeline {pid} not found")
        keep = self._filter(q)
        items = [v for v in self.versions.values() if v["pipeline_id"] == pid and keep(v)]
        return 200, self._page(items, q, "pipeline_versions", "V2beta1ListPipelineVersionsResponse")

    def _get_version(self, rec, pid, vid, **_):
        self._query(rec, set())
        version = self.versions.get(vid)
        if not version or version["pipeline_id"] != pid:
            raise ApiError(404, f"pipeline version {vid} not found")
        return 200, check_response({k: v for k, v in version.items() if not k.startswith("_")}, "V2beta1PipelineVersion")

    def _create_experiment(self, rec, raw, **_):
        self._query(rec, set())
        data, exp = parse_body(raw, "V2beta1Experiment", "experiment")
        rec.body = data
        if not exp.display_name:
            raise ApiError(400, "Invalid input error: experiment display_name is empty")
        namespace = self._namespace(exp.namespace, "an experiment") if self.multi_user else ""
        if any(e["display_name"] == exp.display_name and e["namespace"] == namespace for e in self.experiments.values()):
            raise ApiError(409, f"Already exists: experiment {exp.display_name!r}")
        experiment_id = str(uuid.uuid4())
        experiment = {"experiment_id": experiment_id, "display_name": exp.display_name,
                      "description": exp.description or "", "created_at": _now(), "namespace": namespace,
                      "storage_state": "AVAILABLE", "_seq": self._seq()}
        self.experiments[experiment_id] = experiment
        return 200, check_response({k: v for k, v in experiment.items() if not k.startswith("_")}, "V2beta1Experiment")

    def _list_experiments(self, rec, **_):
        q = self._query(rec, {"page_token", "page_size", "sort_by", "filter", "namespace"})
        namespace = self._namespace(q.get("namespace"), "listing experiments") if self.multi_user else ""
        keep = self._filter(q)
        items = [e for e in self.experiments.values() if e["namespace"] == namespace and keep(e)]
        return 200, self._page(items, q, "experiments", "V2beta1ListExperimentsResponse")

    def _get_experiment(self, rec, eid, **_):
        self._query(rec, set())
        if eid not in self.experiments:
            raise ApiError(404, f"experiment {eid} not found")
        return 200, check_response({k: v for k, v in self.experiments[eid].items() if not k.startswith("_")},
                                   "V2beta1Experiment")

    def _check_pipeline_source(self, obj, runtime_config, what: str) -> str:
        """Exactly one source; the version exists; parameters fit its spec. Returns the version id."""
        ref = obj.pipeline_version_reference
        if obj.pipeline_spec is not None and ref is not None:
            raise ApiError(400, f"{what}: set either pipeline_spec or pipeline_version_reference, not both")
        if ref is None:
            raise ApiError(400, f"{what}: needs pipeline_version_reference (pipeline_id and pipeline_version_id)")
        if not ref.pipeline_id or ref.pipeline_id not in self.pipelines:
            raise ApiError(400, f"{what}: pipeline {ref.pipeline_id!r} not found")
        version = self.versions.get(ref.pipeline_version_id or "")
        if not version or version["pipeline_id"] != ref.pipeline_id:
            raise ApiError(400, f"{what}: pipeline version {ref.pipeline_version_id!r} of {ref.pipeline_id} not found")
        definitions = self.specs[version["pipeline_version_id"]]["root"]["inputDefinitions"]["parameters"]
        given = (runtime_config.parameters if runtime_config else None) or {}
        unknown = sorted(set(given) - set(definitions))
        if unknown:
            raise ApiError(400, f"{what}: parameter(s) {unknown} are not inputs of the pipeline")
        for name, definition in definitions.items():
            if name not in given:
                if "defaultValue" not in definition and not definition.get("isOptional"):
                    raise ApiError(400, f"{what}: required parameter {name!r} is missing")
                continue
            allowed = PARAMETER_TYPES[definition["parameterType"]]
            value = given[name]
            if isinstance(value, bool) != (bool in allowed) or not isinstance(value, allowed):
                raise ApiError(400, f"{what}: parameter {name!r} must be {definition['parameterType']}, got {value!r}")
        return version["pipeline_version_id"]

    def _experiment_of(self, experiment_id: str | None, what: str) -> dict:
        if not experiment_id:
            raise ApiError(400, f"{what}: experiment_id is empty (this client must always name its experiment)")
        if experiment_id not in self.experiments:
            raise ApiError(400, f"{what}: experiment {experiment_id} not found")
        return self.experiments[experiment_id]

    def _create_run(self, rec, raw, **_):
        self._query(rec, {"experiment_id"})
        data, run = parse_body(raw, "V2beta1Run", "run")
        rec.body = data
        if not run.display_name:
            raise ApiError(400, "Invalid input error: run display_name is empty")
        self._experiment_of(run.experiment_id, "run")
        self._check_pipeline_source(run, run.runtime_config, "run")
        run_id = str(uuid.uuid4())
        stored = dict(data, run_id=run_id, created_at=_now(), state="PENDING",
                      state_history=[{"update_time": _now(), "state": "PENDING"}], storage_state="AVAILABLE")
        self.runs[run_id] = stored
        self._run_gets[run_id] = 0
        return 200, check_response(stored, "V2beta1Run")

    def _get_run(self, rec, rid, **_):
        self._query(rec, {"experiment_id"})
        if rid not in self.runs:
            raise ApiError(404, f"run {rid} not found")
        run = self.runs[rid]
        index = min(self._run_gets[rid], len(self.run_states) - 1)
        self._run_gets[rid] += 1
        state = self.run_states[index]
        if state != run["state"]:
            run["state"] = state
            run["state_history"].append({"update_time": _now(), "state": state})
            if state in ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"):
                run["finished_at"] = _now()
            if state == "SUCCEEDED":
                run["run_details"] = {"task_details": [
                    {"run_id": rid, "task_id": str(uuid.uuid4()), "display_name": name, "state": task_state}
                    for name, task_state in self.succeeded_tasks.items()]}
            if state == "FAILED":
                run["error"] = {"code": 2, "message": "task 'finetune' failed: exit status 1", "details": []}
                run["run_details"] = {"task_details": [
                    {"run_id": rid, "task_id": str(uuid.uuid4()), "display_name": "finetune", "state": "FAILED",
                     "error": {"code": 2, "message": "exit status 1", "details": []}}]}
        return 200, check_response(run, "V2beta1Run")

    def _create_recurring_run(self, rec, raw, **_):
        self._query(rec, set())
        data, rr = parse_body(raw, "V2beta1RecurringRun", "recurring_run")
        rec.body = data
        if not rr.display_name:
            raise ApiError(400, "Invalid input error: recurring run display_name is empty")
        if rr.mode not in ("ENABLE", "DISABLE"):
            raise ApiError(400, f"recurring run mode must be ENABLE or DISABLE, got {rr.mode!r}")
        experiment = self._experiment_of(rr.experiment_id, "recurring run")
        self._check_pipeline_source(rr, rr.runtime_config, "recurring run")
        trigger = rr.trigger
        if trigger is None or (trigger.cron_schedule is None) == (trigger.periodic_schedule is None):
            raise ApiError(400, "recurring run needs a trigger with exactly one of cron_schedule, periodic_schedule")
        if trigger.cron_schedule is not None:
            try:
                robfig_parse(trigger.cron_schedule.cron or "")
            except ValueError as exc:
                raise ApiError(400, f"Schedule cron is not a supported format(https://godoc.org/github.com/robfig/cron). "
                                    f"Error: {exc}") from None
        max_concurrency = int(rr.max_concurrency or 0)
        if not 1 <= max_concurrency <= 10:
            raise ApiError(400, f"The max concurrency of the recurring run is out of range. Support 1-10. "
                                f"Received {max_concurrency}.")
        rrid = str(uuid.uuid4())
        stored = dict(data, recurring_run_id=rrid, created_at=_now(), updated_at=_now(),
                      status="ENABLED" if rr.mode == "ENABLE" else "DISABLED", namespace=experiment["namespace"],
                      max_concurrency=str(max_concurrency), _seq=self._seq())
        self.recurring_runs[rrid] = stored
        return 200, check_response(self._public(stored), "V2beta1RecurringRun")

    @staticmethod
    def _public(item: dict) -> dict:
        return {k: v for k, v in item.items() if not k.startswith("_")}

    def _list_recurring_runs(self, rec, **_):
        q = self._query(rec, {"page_token", "page_size", "sort_by", "namespace", "filter", "experiment_id"})
        if self.multi_user and not q.get("namespace") and not q.get("experiment_id"):
            raise ApiError(400, "Invalid input error: list recurring runs needs a namespace in multi-user mode")
        if not self.multi_user and q.get("namespace"):
            raise ApiError(400, "Invalid ListRecurringRuns request. Namespace should not be provided in single-user mode.")
        keep = self._filter(q)
        items = [r for r in self.recurring_runs.values() if keep(r)
                 and (not self.multi_user or not q.get("namespace") or r["namespace"] == q["namespace"])
                 and (not q.get("experiment_id") or r["experiment_id"] == q["experiment_id"])]
        return 200, self._page(items, q, "recurring_runs", "V2beta1ListRecurringRunsResponse")

    def _rr(self, rrid: str) -> dict:
        if rrid not in self.recurring_runs:
            raise ApiError(404, f"recurring run {rrid} not found")
        return self.recurring_runs[rrid]

    def _get_recurring_run(self, rec, rrid, **_):
        self._query(rec, set())
        return 200, check_response(self._public(self._rr(rrid)), "V2beta1RecurringRun")

    def _enable(self, rec, raw, rrid, **_):
        self._query(rec, set())
        self._no_body(raw)
        self._rr(rrid).update(mode="ENABLE", status="ENABLED", updated_at=_now())
        return 200, {}

    def _disable(self, rec, raw, rrid, **_):
        self._query(rec, set())
        self._no_body(raw)
        self._rr(rrid).update(mode="DISABLE", status="DISABLED", updated_at=_now())
        return 200, {}

    def _delete_recurring_run(self, rec, rrid, **_):
        self._query(rec, {"propagation_policy"})
        self._rr(rrid)
        del self.recurring_runs[rrid]
        return 200, {}
