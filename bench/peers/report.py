"""The peers section's figures: ratios taken within each round, the issue's
targets judged on their medians, and the markdown of bench/results/latest.md.
Pure functions of the section's JSON (tested in tests/unit/test_peers_report.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SERVERS = {"service": "this service", "kserve": "KServe", "mlserver": "MLServer",
           "mlserver_adaptive": "MLServer, adaptive batching"}
# case: (bench.workloads name, concurrent callers)
CASES = {"heavy_c8": ("heavy", 8), "small_c1": ("small", 1), "small_c32": ("small", 32)}
# The in-process ONNX Runtime references: heavy batches of 8, and single 16-token calls.
ORT = {"heavy_c8": "heavy_ort_b8", "small_c1": "small_ort_b1", "small_c32": "small_ort_b1"}


@dataclass(frozen=True)
class Target:
    """`b`'s `key_b` over `a`'s `key_a`, round by round; met when the median is within `limit`."""

    label: str
    b: str
    key_b: str
    a: str
    key_a: str
    at_most: bool
    limit: float

    @property
    def text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.limit:g}"

    def met(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit


TARGETS = (
    Target("single call, 1 x 16, full attention: service p50 / KServe p50", "small_c1_service", "p50_ms",
           "small_c1_kserve", "p50_ms", True, 0.8),
    Target("single call, 1 x 16: service p50 / in-process ORT p50", "small_c1_service", "p50_ms", "small_ort_b1",
           "p50_ms", True, 1.3),
    Target("single call, 1 x 16: service p99 / in-process ORT p50", "small_c1_service", "p99_ms", "small_ort_b1",
           "p50_ms", True, 2.0),
    Target("heavy, 8 clients x 1 x 128: service seq/s / KServe seq/s", "heavy_c8_service", "rps", "heavy_c8_kserve",
           "rps", False, 2.0),
    Target("heavy, 8 clients x 1 x 128: service seq/s / in-process ORT batch 8", "heavy_c8_service", "rps",
           "heavy_ort_b8", "rps", False, 0.85),
    Target("32 clients x 1 x 16: service req/s / KServe req/s", "small_c32_service", "rps", "small_c32_kserve", "rps",
           False, 2.0),
)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def ratio(runs: dict[str, list[dict[str, Any]]], b: str, key_b: str, a: str, key_a: str) -> dict[str, Any]:
    """b[key_b] / a[key_a] within each round (the same round of both); None where a is 0."""
    per_round = [rb[key_b] / ra[key_a] if ra[key_a] else None for rb, ra in zip(runs[b], runs[a], strict=True)]
    known = [x for x in per_round if x is not None]
    return {**(spread(known) if known else {"median": None, "min": None, "max": None}), "per_round": per_round}


def targets(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every target whose two sides were measured; a missed one stays, with met False."""
    rows = []
    for t in TARGETS:
        if t.a in runs and t.b in runs:
            r = ratio(runs, t.b, t.key_b, t.a, t.key_a)
            rows.append({"ratio": t.label, **r, "target": t.text,
                         "met": r["median"] is not None and t.met(r["median"])})
    return rows


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    keys = ("rps", "p50_ms", "p99_ms", "server_cpu_ms_per_call")
    return {name: {k: spread([r[k] for r in rounds]) for k in keys if k in rounds[0]}
            for name, rounds in runs.items() if rounds}


def _cell(s: dict[str, dict[str, float]] | None, key: str, digits: int) -> str:
    if not s or key not in s:
        return "-"
    v = s[key]
    return f"{v['median']:.{digits}f} ({v['min']:.{digits}f}-{v['max']:.{digits}f})"


# Rows of the peer table: (label, case, key, digits, what the ORT column is).
ROWS = (
    ("heavy: 8 clients x 1x128, full fp32 attention, seq/s", "heavy_c8", "rps", 1, "batch 8"),
    ("short: 1 client x 1x16, p50 ms", "small_c1", "p50_ms", 2, "one call"),
    ("short: 1 client x 1x16, p99 ms", "small_c1", "p99_ms", 2, "one call"),
    ("short: 32 clients x 1x16, req/s", "small_c32", "rps", 0, "batch-1 loop"),
    ("heavy: server CPU ms per sequence", "heavy_c8", "server_cpu_ms_per_call", 1, ""),
    ("short, 1 client: server CPU ms per call", "small_c1", "server_cpu_ms_per_call", 2, ""),
)


def table(peers: dict[str, Any]) -> list[str]:
    s, versions = peers["summary"], peers.get("versions", {})
    heads = [f"{label} {versions[name]}" if name in versions else label for name, label in SERVERS.items()]
    lines = ["| workload | in-process ORT | " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(SERVERS) + 1)]
    for label, case, key, digits, ort_as in ROWS:
        ort = f"{_cell(s.get(ORT[case]), key, digits)} ({ort_as})" if ort_as and ORT[case] in s else "-"
        cells = [_cell(s.get(f"{case}_{name}"), key, digits) for name in SERVERS]
        lines.append(f"| {label} | {ort} | " + " | ".join(cells) + " |")
    return lines


def markdown(peers: dict[str, Any], date: str) -> list[str]:
    loads = peers["loadavg"]
    lines = ["", f"## Peers over the Open Inference Protocol ({date})", "",
             "This service, KServe's Python model server and MLServer (the latter also with adaptive batching, "
             f"{peers['adaptive']}), each serving the same `model.onnx` with ONNX Runtime (intra-op threads = cores), "
             "driven by one tritonclient gRPC load generator (bench/oip_loadgen.py `--inputs ids`) with the same "
             "token ids: `input_ids` and `attention_mask` in, `last_hidden_state` and `attentions` (FP32) out. "
             "In-process ONNX Runtime on the same ids for reference. "
             f"{peers['rounds']} interleaved rounds, {peers['seconds_per_run']} s a run after its own warm-up; each "
             "figure is the median over the rounds, the range (min-max) in brackets. Server CPU per call: the "
             "server's processes (MLServer's worker included), from /proc, over the run with its warm-up. "
             f"Load average (1, 5, 15 min) at the start: {loads[0]}; at each round: {'; '.join(loads[1:-1])}; at "
             f"the end: {loads[-1]}.", ""]
    lines += table(peers)
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---|---|"]
    for r in peers["targets"]:
        value = "-" if r["median"] is None else f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"
        lines.append(f"| {r['ratio']} | {value} | {r['target']} | {'yes' if r['met'] else 'NO'} |")
    return lines
