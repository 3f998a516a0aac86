"""Recurring runs (schedules) of the pipeline on a Kubeflow Pipelines cluster, and their cron expressions.

    create_schedule(cfg, conn, cron="0 3 * * *") # a recurring run: catch-up off, max concurrency 1
    list_schedules(conn); set_schedule_enabled(conn, "nightly", False); delete_schedule(conn, "nightly")
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable

from pipelines.cluster.connection import (
    ClusterError,
    Connection,
    api_call,
    connect,
    equals_filter,
    request_namespace,
)
from pipelines.cluster.runs import compile_and_upload, ensure_experiment
from pipelines.config import Config

# ---------------------------------------------------------------------------
# Cron: KFP's scheduler uses robfig/cron v1, whose parser takes SIX fields
# (seconds first) and treats the sixth, day-of-week, as optional. A standard
# 5-field "0 3 * * *" would therefore parse as second 0, minute 3, EVERY hour:
# hourly retraining instead of daily. So 5 fields are converted, never passed on.
# ---------------------------------------------------------------------------

_MONTHS = {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}
_DAYS = {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}
# name, low, high, names, '?' allowed
_CRON_FIELDS = (
    ("second", 0, 59, {}, False),
    ("minute", 0, 59, {}, False),
    ("hour", 0, 23, {}, False),
    ("day of month", 1, 31, {}, True),
    ("month", 1, 12, _MONTHS, False),
    ("day of week", 0, 6, _DAYS, True),
)
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
CRON_HELP = ("a cron expression: 5 fields 'minute hour day-of-month month day-of-week' (e.g. '0 3 * * *' = "
             "03:00 daily), KFP's 6 fields with seconds first ('0 0 3 * * *'), or @daily/@weekly/@hourly/...")


def kfp_cron(expression: str) -> tuple[str, str | None]:
    """Validate a cron expression and return (KFP's 6-field form, a note when it was converted)."""
    expr = " ".join(expression.split())
    if expr.startswith("@"):
        if expr in _DESCRIPTORS:
            return expr, None
        raise ValueError(f"cron {expression!r}: unknown descriptor; use one of {', '.join(_DESCRIPTORS)} "
                         "(KFP's @every needs a periodic schedule, which mlops schedule does not create)")
    fields = expr.split(" ") if expr else []
    if len(fields) == 5:
        six = ["0"] + fields
        note = (f"converted the 5-field cron {expr!r} to KFP's 6-field form {' '.join(six)!r} "
                "(seconds first; KFP's scheduler would read 5 fields as seconds-minute-hour-...)")
    elif len(fields) == 6:
        six, note = fields, None
    else:
        raise ValueError(f"cron {expression!r} has {len(fields)} fields; expected {CRON_HELP}")
    for value, (name, low, high, names, question) in zip(six, _CRON_FIELDS):
        _check_cron_field(expression, value, name, low, high, names, question)
    return " ".join(six), note


def _check_cron_field(expression: str, value: str, name: str, low: int, high: int, names: dict, question: bool):
    def number(token: str) -> int:
        if token.upper() in names:
            return names[token.upper()]
        if not token.isdigit():
            raise ValueError(f"cron {expression!r}: {name} field {value!r} has {token!r}, not a number"
                             + (f" or a name ({', '.join(names)})" if names else ""))
        n = int(token)
        if not low <= n <= high:
            hint = " (Sunday is 0)" if name == "day of week" and n == 7 else ""
            raise ValueError(f"cron {expression!r}: {name} {n} is outside {low}-{high}{hint}")
        return n

    if value == "?":
        if not question:
            raise ValueError(f"cron {expression!r}: '?' is only allowed for day of month and day of week")
        return
    for part in value.split(","):
        base, slash, step = part.partition("/")
        if slash and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"cron {expression!r}: {name} step {step!r} must be a positive number")
        if base == "*":
            continue
        start, dash, end = base.partition("-")
        first = number(start)
        if dash and number(end) < first:
            raise ValueError(f"cron {expression!r}: {name} range {base!r} runs backwards")


# ---------------------------------------------------------------------------
# Recurring runs (schedules)
# ---------------------------------------------------------------------------

@dataclass
class Schedule:
    recurring_run_id: str
    name: str
    cron: str
    enabled: bool
    max_concurrency: int
    no_catchup: bool
    experiment_id: str
    pipeline_version_id: str
    created_at: str

    @classmethod
    def from_api(cls, rr) -> "Schedule":
        trigger = rr.trigger
        cron = (trigger.cron_schedule.cron if trigger and trigger.cron_schedule
                else f"every {trigger.periodic_schedule.interval_second}s" if trigger and trigger.periodic_schedule
                else "")
        ref = rr.pipeline_version_reference
        return cls(rr.recurring_run_id, rr.display_name or "", cron, rr.mode == "ENABLE",
                   int(rr.max_concurrency or 0), bool(rr.no_catchup), rr.experiment_id or "",
                   (ref.pipeline_version_id if ref else rr.pipeline_version_id) or "",
                   rr.created_at.isoformat() if rr.created_at else "")


DEFAULT_SCHEDULE_NAME = "kfp-mlops-retrain"


def create_schedule(cfg: Config, conn: Connection, *, cron: str, name: str = DEFAULT_SCHEDULE_NAME,
                    max_concurrency: int = 1, experiment: str | None = None, pipeline_name: str | None = None,
                    out: Callable[[str], None] = print, client=None) -> Schedule:
    """A KFP recurring run of the pipeline: catch-up off (a paused schedule does not
    replay every missed slot when resumed), at most ``max_concurrency`` runs at once."""
    from pipelines.pipeline import run_parameters

    cron6, note = kfp_cron(cron)  # validate before touching the cluster
    if not 1 <= max_concurrency <= 10:
        raise ValueError(f"--max-concurrency must be 1-10 (KFP's limit), got {max_concurrency}")
    if not name.strip():
        raise ValueError("a schedule needs a --name")
    if note:
        out(note)
    cluster = cfg.cluster
    experiment = experiment or cluster.experiment
    pipeline_name = pipeline_name or cluster.pipeline_name
    client = client or connect(conn)
    clash = _schedules_named(client, conn, name)
    if clash:
        raise ClusterError(f"a schedule named {name!r} already exists ({clash[0].recurring_run_id}); "
                           f"delete it first (mlops schedule delete {name}) or pass another --name")
    pipeline_id, version_id, _, _, _ = compile_and_upload(cfg, client, conn, pipeline_name, out)
    experiment_id = ensure_experiment(client, conn, experiment)
    rr = api_call(conn.describe(), "create recurring run", client.create_recurring_run, experiment_id, name,
                  description=f"Scheduled retraining of {pipeline_name} ({cron6}), created by mlops schedule",
                  cron_expression=cron6, max_concurrency=max_concurrency, no_catchup=True,
                  params=run_parameters(cfg), pipeline_id=pipeline_id, version_id=version_id, enabled=True,
                  service_account=cluster.service_account or None)
    schedule = Schedule.from_api(rr)
    out(f"Schedule {name!r} ({schedule.recurring_run_id}) created: cron {cron6!r} (the KFP scheduler's time zone, "
        f"usually UTC), max {max_concurrency} concurrent run(s), catch-up off, experiment {experiment!r}")
    return schedule


def list_schedules(conn: Connection, *, client=None) -> list[Schedule]:
    client = client or connect(conn)
    schedules, token = [], ""
    while True:
        page = api_call(conn.describe(), "list recurring runs", client.list_recurring_runs, page_token=token,
                        page_size=100, namespace=request_namespace(conn))
        schedules += [Schedule.from_api(rr) for rr in (page.recurring_runs or [])]
        token = page.next_page_token or ""
        if not token:
            return schedules


def _schedules_named(client, conn: Connection, name: str) -> list[Schedule]:
    page = api_call(conn.describe(), "list recurring runs", client.list_recurring_runs,
                    filter=equals_filter("display_name", name), namespace=request_namespace(conn), page_size=100)
    return [Schedule.from_api(rr) for rr in (page.recurring_runs or [])]


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)


def find_schedule(conn: Connection, name_or_id: str, *, client=None) -> Schedule:
    """The schedule with this id, or the one schedule with this name."""
    client = client or connect(conn)
    if _UUID.match(name_or_id):
        return Schedule.from_api(api_call(conn.describe(), "get recurring run", client.get_recurring_run, name_or_id))
    matches = _schedules_named(client, conn, name_or_id)
    if not matches:
        raise ClusterError(f"no schedule named {name_or_id!r}; 'mlops schedule list' shows the names and ids")
    if len(matches) > 1:
        ids = ", ".join(s.recurring_run_id for s in matches)
        raise ClusterError(f"{len(matches)} schedules are named {name_or_id!r} ({ids}); pass the id instead")
    return matches[0]


def set_schedule_enabled(conn: Connection, name_or_id: str, enabled: bool, *, client=None) -> Schedule:
    client = client or connect(conn)
    schedule = find_schedule(conn, name_or_id, client=client)
    if enabled:
        api_call(conn.describe(), "enable recurring run", client.enable_recurring_run, schedule.recurring_run_id)
    else:
        api_call(conn.describe(), "disable recurring run", client.disable_recurring_run, schedule.recurring_run_id)
    return dataclasses.replace(schedule, enabled=enabled)


def delete_schedule(conn: Connection, name_or_id: str, *, client=None) -> Schedule:
    client = client or connect(conn)
    schedule = find_schedule(conn, name_or_id, client=client)
    api_call(conn.describe(), "delete recurring run", client.delete_recurring_run, schedule.recurring_run_id)
    return schedule


def format_schedules(schedules: list[Schedule]) -> str:
    if not schedules:
        return "no schedules"
    rows = [("ID", "NAME", "STATE", "CRON", "MAX", "CATCH-UP", "CREATED")]
    rows += [(s.recurring_run_id, s.name, "enabled" if s.enabled else "paused", s.cron, str(s.max_concurrency),
              "off" if s.no_catchup else "on", s.created_at) for s in schedules]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
