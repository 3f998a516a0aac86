"""The report: one table row per load run, the medians of the rounds, and the JSON line."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, rounded to 2 places (0 safe)."""
    return round(numerator / max(denominator, 1e-9), 2)


def tail_ratio(row: dict[str, Any]) -> float:
    """p99 / p50 of one load run."""
    return ratio(row["p99_ms"], row["p50_ms"])


def table(rows: list[dict[str, Any]]) -> str:
    """One line per run; CPU ms/request: the server's main process (TorchServe: the Java frontend; the peer:
    uvicorn's supervisor), its Python worker processes, and the load generator."""
    head = (f"{'server':<40} {'conc':>4} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99/p50':>7} {'errors':>6}"
            f" | CPU ms/request: {'main':>6} {'workers':>7} {'proxy':>6} {'load gen':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['server']:<40} {r['concurrency']:>4} {r['req_per_s']:>7.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
            f"{tail_ratio(r):>7.1f} {r['non_2xx'] + r['socket_errors']:>6}"
            f" | {'':>15} {r['cpu_ms_frontend']:>6.3f} {r['cpu_ms_workers']:>7.3f} {r.get('cpu_ms_proxy', 0.0):>6.3f}"
            f" {r['cpu_ms_loadgen']:>8.3f}"
        )
    return "\n".join(lines)


def row_summary(row: dict[str, Any]) -> dict[str, Any]:
    """One load run as the JSON line gives it."""
    return {"req_per_s": round(row["req_per_s"], 1), "p50_ms": round(row["p50_ms"], 3), "p99_ms": round(row["p99_ms"], 3),
            "errors": row["non_2xx"] + row["socket_errors"], "cpu_ms_per_request": {
                "main": round(row["cpu_ms_frontend"], 3), "workers": round(row["cpu_ms_workers"], 3),
                "proxy": round(row.get("cpu_ms_proxy", 0.0), 3),
                "load_generator": round(row["cpu_ms_loadgen"], 3)}}


def noise_line(noise: dict[str, float]) -> str:
    """One line on the machine's own slow-downs (``tail.machine_noise``)."""
    return (f"machine noise (servers idle): slowed {noise['slowed_pct']:.1f} % of the time, {noise['stalls_per_s']:.1f} "
            f"stalls >= 5 ms a second (p90 {noise['stall_p90_ms']:.0f} ms, max {noise['stall_max_ms']:.0f} ms)")


def attribution_lines(a: dict[str, float], concurrency: int) -> str:
    """The tail attribution (``tail.attribute_tail``) in words."""
    return (f"tail attribution, one more run at concurrency {concurrency} with a stall probe (latency as TorchServe's "
            f"access log records it, whole ms):\n"
            f"  all {a['requests']} requests: p50 {a['p50_ms']:.0f} ms, p99 {a['p99_ms']:.0f} ms (p99/p50 "
            f"{ratio(a['p99_ms'], a['p50_ms']):.1f}; the client saw {a['client_p50_ms']:.1f} / {a['client_p99_ms']:.1f} ms)\n"
            f"  the {a['outside_stalls_pct']:.1f} % not in flight while the host slowed the CPU "
            f"({a['probe_slow_samples']} of {a['probe_samples']} probe samples): p50 {a['outside_stalls_p50_ms']:.0f} ms, "
            f"p99 {a['outside_stalls_p99_ms']:.0f} ms (p99/p50 {ratio(a['outside_stalls_p99_ms'], a['outside_stalls_p50_ms']):.1f})\n"
            f"  control, the same windows 0.37 s later: {a['control_kept_pct']:.1f} % kept, p99 {a['control_p99_ms']:.0f} ms")


def round_order(variants: dict[str, Any]) -> tuple[str, ...]:
    """The servers in the order each round measures them (and the tables list them)."""
    return ("ours", *variants, "ours-proxied", "ours-nolog", "defaults", "peer")


# Above this share of slowed probe samples with the servers idle, the machine is busy with other work (an idle
# 2-core VM showed 4.6-10.3 %), and the goals' figures say more about the other work than about the servers.
BUSY_MACHINE_SLOWED_PCT = 20.0
# The goals: (JSON key, at least or at most, bound). None where that part was not measured.
GOALS = (("ratio_vs_peer", "min", 2.0), ("ratio_vs_peer_proxied", "min", 1.5),
         ("c1_p50_over_peer", "max", 1.5), ("c1_p50_over_peer_proxied", "max", 1.5),
         ("server_p99_over_p50_outside_host_stalls", "max", 3.0))


def goals(result: dict[str, Any]) -> dict[str, Any]:
    """Each goal with its measured value and whether it is met (``null`` when not measured in this run)."""
    out = {}
    for key, kind, bound in GOALS:
        value = result.get(key)
        met = None if value is None else (value >= bound if kind == "min" else value <= bound)
        out[key] = {"value": value, "goal": f"{'>=' if kind == 'min' else '<='} {bound}", "met": met}
    return out


def goals_lines(result: dict[str, Any]) -> str:
    """The goals and, at the lowest concurrency, where our extra latency goes, in words."""
    lines = ["goals:"]
    for key, goal in result["goals"].items():
        state = "not measured" if goal["met"] is None else "met" if goal["met"] else "NOT met"
        lines.append(f"  {key} = {goal['value']} (goal {goal['goal']}): {state}")
    if "goals_note" in result:
        lines.append(f"  {result['goals_note']}")
    gathering = next((k for k in result if k.endswith("_batch_gathering_ms")), None)
    if gathering:
        low = gathering.split("_")[0]
        lines.append(f"  at {low}: the unbatched twin saves a lone request {result[gathering]:.2f} ms of p50, TorchServe's "
                     f"batch gathering (it waits up to maxBatchDelay for a second request although none is queued); "
                     f"the rest, {result[f'{low}_rest_over_peer_ms']:+.2f} ms over the peer, is the frontend-to-worker "
                     f"hop and TorchServe's worker")
    return "\n".join(lines)


def low_concurrency(m: "Measurements") -> dict[str, Any]:
    """The lowest concurrency: our p50 against the peer's, directly and through the proxy, and where the
    difference goes: TorchServe's batch gathering (what the unbatched twin saves: the batched model alone) and the
    rest."""
    low = min(m.concurrency)
    if low == m.top:
        return {}
    rows = {name: m.median_row(name, low) for name in ("ours", "ours-batched", "ours-proxied", "peer")}
    out: dict[str, Any] = {f"c{low}_p50_ms": {k: round(r["p50_ms"], 3) for k, r in rows.items() if r}}
    peer, ours = rows["peer"], rows["ours"]
    if peer and ours:
        out["c1_p50_over_peer" if low == 1 else f"c{low}_p50_over_peer"] = ratio(ours["p50_ms"], peer["p50_ms"])
        if rows["ours-proxied"]:
            out["c1_p50_over_peer_proxied" if low == 1 else f"c{low}_p50_over_peer_proxied"] = ratio(
                rows["ours-proxied"]["p50_ms"], peer["p50_ms"])
        if rows["ours-batched"]:
            out[f"c{low}_p50_over_peer_batched_model_only"] = ratio(rows["ours-batched"]["p50_ms"], peer["p50_ms"])
            out[f"c{low}_batch_gathering_ms"] = round(rows["ours-batched"]["p50_ms"] - ours["p50_ms"], 3)
            out[f"c{low}_rest_over_peer_ms"] = round(ours["p50_ms"] - peer["p50_ms"], 3)
    return out


@dataclass
class Measurements:
    """Everything one benchmark run measured, for the report and the JSON line."""

    concurrency: list[int]
    rounds: int
    duration_s: float
    load_generator: str
    targets: list[str]  # the servers measured, by name
    variants: dict[str, dict[str, Any]]  # "variant-NAME" -> its settings
    runs: dict[tuple[str, int], list[dict[str, Any]]]  # (server, concurrency) -> one row per load run
    noise_rounds: list[dict[str, float]]  # the machine's own slow-downs, probed before each top-concurrency round
    counters_before: dict[str, float]  # TorchServe's frontend counters around the rounds
    counters_after: dict[str, float]
    attribution: dict[str, float] | None
    ceiling: dict[str, float]  # the in-process ceiling; empty when skipped
    request_log_lines: int

    @property
    def top(self) -> int:
        return max(self.concurrency)

    def median_row(self, name: str, c: int) -> dict[str, Any] | None:
        rows = sorted(self.runs.get((name, c), []), key=lambda r: r["req_per_s"])
        return rows[len(rows) // 2] if rows else None  # the median run (upper median for an even count)

    def frontend_split_ms(self) -> tuple[float, float]:
        """Mean ms a request spent queued in TorchServe's frontend, and in its backend, over the rounds."""
        before, after = self.counters_before, self.counters_after
        n = max(1.0, after.get("ts_inference_requests_total", 0) - before.get("ts_inference_requests_total", 0))
        queue_ms = (after.get("ts_queue_latency_microseconds", 0) - before.get("ts_queue_latency_microseconds", 0)) / n / 1000
        backend_ms = (after.get("ts_inference_latency_microseconds", 0) - before.get("ts_inference_latency_microseconds", 0)) / n / 1000
        return queue_ms, backend_ms

    def median_noise(self) -> dict[str, float]:
        return {k: round(statistics.median(r[k] for r in self.noise_rounds), 2) for k in self.noise_rounds[0]}


def print_summary(m: Measurements) -> None:
    """The medians table, the frontend split, the machine's noise, the tail attribution and the ceiling."""
    top, ceiling = m.top, m.ceiling
    summary_rows = [r for c in sorted(m.concurrency) for name in ("ours-batched", *round_order(m.variants))
                    if (r := m.median_row(name, c)) is not None]
    print(f"\nmedians ({m.rounds} interleaved rounds at concurrency {top}, {m.duration_s:.0f} s each; "
          f"load generator: {m.load_generator}, one process):")
    print(table(summary_rows))
    queue_ms, backend_ms = m.frontend_split_ms()
    if ceiling:
        print(f"\nin-process, one thread: forward {ceiling['forward_b1_per_s']:.0f}/s at batch 1, "
              f"{ceiling['forward_b8_images_per_s']:.0f} images/s at batch 8; whole handler "
              f"{ceiling['handler_b1_per_s']:.0f} requests/s at batch 1, {ceiling['handler_b8_requests_per_s']:.0f} at batch 8 "
              f"(decode {ceiling['decode_us']:.0f} us, model {ceiling['model_us']:.0f} us, answer {ceiling['answer_us']:.0f} us); "
              f"decoding one PNG {ceiling['decode_image_us']:.0f} us against {ceiling['decode_image_baseline_us']:.0f} us "
              f"with Pillow's usual np.asarray path; the worker reading a request of a batch of 32 from the frontend "
              f"{ceiling['worker_read_us']:.0f} us against {ceiling['worker_read_baseline_us']:.0f} us with TorchServe's "
              f"own reader; serialising an answer {ceiling['answer_encode_us']:.1f} us against "
              f"{ceiling['answer_encode_baseline_us']:.1f} us with json.dumps")
    print(f"torchserve at concurrency {top}: mean {queue_ms:.2f} ms queued in the frontend, "
          f"{backend_ms:.2f} ms in the backend (batch wait + worker)")
    print(noise_line(m.median_noise()).replace("machine noise", "machine noise, median of the rounds"))
    if m.attribution:
        print(attribution_lines(m.attribution, top))
    if ceiling:
        print(f"the work alone, in process: batches of 32 requests back to back, p50 {ceiling['handler_b32_p50_ms']:.2f} ms, "
              f"p99 {ceiling['handler_b32_p99_ms']:.2f} ms (p99/p50 "
              f"{ceiling['handler_b32_p99_ms'] / ceiling['handler_b32_p50_ms']:.1f}: the machine's noise floor for this work)")


def build_result(m: Measurements, settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON line: our server at the top concurrency first, then each comparison that ran.

    ``settings``: the shipped settings the run used (and its own: peer workers, duration, rounds).
    """
    top, runs, concurrency = m.top, m.runs, sorted(m.concurrency)
    ours_top = m.median_row("ours", top)
    queue_ms, backend_ms = m.frontend_split_ms()
    noise = m.median_noise()
    noise_rounds = m.noise_rounds
    result: dict[str, Any] = {
        f"throughput_c{top}": round(ours_top["req_per_s"], 1),
        f"p50_ms_c{top}": round(ours_top["p50_ms"], 3),
        f"p99_ms_c{top}": round(ours_top["p99_ms"], 3),
        "p99_over_p50": tail_ratio(ours_top),
        "load_generator": m.load_generator,
        "settings": settings,
        "ours": {str(c): row_summary(r) for c in concurrency if (r := m.median_row("ours", c))},
        "ours_rounds_c_top": [round(r["req_per_s"], 1) for r in runs[("ours", top)]],
        "frontend_queue_ms_mean": round(queue_ms, 3),
        "backend_ms_mean": round(backend_ms, 3),
        "request_log_lines": m.request_log_lines,
        "machine_noise": {**noise, "rounds_slowed_pct": [round(r["slowed_pct"], 2) for r in noise_rounds],
                          "rounds_stalls_per_s": [round(r["stalls_per_s"], 2) for r in noise_rounds]},
        "ours_rounds_p99_over_p50": [tail_ratio(r) for r in runs[("ours", top)]],
    }
    if m.attribution:
        attribution = m.attribution
        result["tail_attribution"] = {k: round(v, 2) for k, v in attribution.items()}
        result["server_p99_over_p50_outside_host_stalls"] = ratio(attribution["outside_stalls_p99_ms"],
                                                                  attribution["outside_stalls_p50_ms"])
    if m.variants:
        ours_rounds = runs[("ours", top)]
        result["variants"] = {}
        for vname, variant in m.variants.items():
            rows = runs[(vname, top)]
            row = m.median_row(vname, top)
            result["variants"][vname[8:]] = {
                "settings": {k: v for k, v in variant.items() if v != settings[k]}, **row_summary(row),
                "p99_over_p50": tail_ratio(row),
                # round by round against the shipped server measured just before it
                "rounds_p99_over_p50": [tail_ratio(r) for r in rows],
                "shipped_rounds_p99_over_p50": [tail_ratio(r) for r in ours_rounds],
                "rounds_req_per_s": [round(r["req_per_s"], 1) for r in rows],
            }
    if "peer" in m.targets:
        peer_top = m.median_row("peer", top)
        result[f"peer_throughput_c{top}"] = round(peer_top["req_per_s"], 1)
        result["ratio_vs_peer"] = ratio(ours_top["req_per_s"], peer_top["req_per_s"])
        result["peer_p99_over_p50"] = tail_ratio(peer_top)
        result["peer"] = {str(c): row_summary(r) for c in concurrency if (r := m.median_row("peer", c))}
        result["peer_rounds_c_top"] = [round(r["req_per_s"], 1) for r in runs[("peer", top)]]
    if "ours-proxied" in m.targets:
        proxied = m.median_row("ours-proxied", top)
        result[f"throughput_c{top}_proxied"] = round(proxied["req_per_s"], 1)
        result["p99_over_p50_proxied"] = tail_ratio(proxied)
        result["proxied"] = {str(top): row_summary(proxied)}
        result["proxied_rounds_c_top"] = [round(r["req_per_s"], 1) for r in runs[("ours-proxied", top)]]
        if "peer" in m.targets:
            result["ratio_vs_peer_proxied"] = ratio(proxied["req_per_s"], m.median_row("peer", top)["req_per_s"])
    if "defaults" in m.targets:
        plain = m.median_row("defaults", top)
        result[f"torchserve_defaults_throughput_c{top}"] = round(plain["req_per_s"], 1)
        result["torchserve_defaults"] = {str(top): row_summary(plain)}
    if "ours-nolog" in m.targets:
        off = m.median_row("ours-nolog", top)
        result[f"throughput_c{top}_log_off"] = round(off["req_per_s"], 1)
        result[f"p99_ms_c{top}_log_off"] = round(off["p99_ms"], 3)
        result["logging_cost_pct"] = round(100 * (off["req_per_s"] - ours_top["req_per_s"]) / off["req_per_s"], 1)
        result["log_off_rounds_c_top"] = [round(r["req_per_s"], 1) for r in runs[("ours-nolog", top)]]
    result.update(low_concurrency(m))
    if ceiling := m.ceiling:
        result["inprocess_per_s"] = round(ceiling["forward_b1_per_s"], 1)
        result["inprocess"] = {k: round(v, 2) for k, v in ceiling.items()}
        result["inprocess_b32_p99_over_p50"] = round(ceiling["handler_b32_p99_ms"] / ceiling["handler_b32_p50_ms"], 2)
    result["goals"] = goals(result)
    if noise["slowed_pct"] > BUSY_MACHINE_SLOWED_PCT:
        result["goals_note"] = (f"not to be trusted: the machine was slowed {noise['slowed_pct']:.0f} % of the time with the "
                                "servers idle (other work on it); under contention the CPU goes to the server with the "
                                "most threads, so the ratios between servers are not what they serve alone: rerun on an "
                                "idle machine")
    return result
