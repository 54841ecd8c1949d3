"""Capacity on paper, from measurements (`make bench ARGS="--only capacity"`).

Two servers side by side, one pinned to one core and one to two (sched_setaffinity; one runtime instance per
core, single-threaded), each driven through the SDK by a closed-loop load generator with 16 callers, in
interleaved rounds, for four workloads: 16 and 128 tokens a request, with the full float32 attention and hidden
states in the reply or only the top-5 pairs of each head. Per call: the server's CPU (read from /proc, so what
else runs on a shared machine does not count), the wall-clock rate, the reply's bytes on the wire, and the
server's memory. The planning table (docs/scaling.md) follows from these: cores = rate x CPU per call / 0.7
(the HPA's target utilisation), with the CPU per call of whichever server spent more, replicas of 4 cores (the
production overlay), and bandwidth = rate x reply."""

from __future__ import annotations

import math
import statistics
from typing import Any

import grpc

from attention_client._proto.attention.v1 import attention_pb2 as pb
from bench import compare
from bench.server import Server
from bench.workloads import HEAVY, PAIRS128, SHORT, SMALL, Workload

CASES: tuple[Workload, ...] = (SHORT, SMALL, PAIRS128, HEAVY)
LABELS = {"short": "16 tokens, top-5 pairs", "small": "16 tokens, full attention",
          "pairs128": "128 tokens, top-5 pairs", "heavy": "128 tokens, full attention"}
CORES = (1, 2)  # the servers measured: pinned to CPU 0, and to CPUs 0-1
CALLERS = 16
RATES = (100, 1_000, 10_000)  # requests/s in the planning table
UTILIZATION = 0.7  # plan cores to be 70% busy: the HPA's and the ScaledObject's CPU target
REPLICA_CORES = 4  # deploy/kubernetes/overlays/production: 4 CPUs, ATTENTION_INSTANCES=4
QUEUE_SECONDS = 0.5  # the KEDA threshold aims at this much queued work per replica (docs/kubernetes.md)


def reply_bytes(target: str, workload: Workload) -> int:
    """Bytes of one Analyze reply on the wire (the serialized AnalyzeResponse) for this workload."""
    o = workload.options
    options = pb.AnalyzeOptions(attention=o["attention"], hidden_states=o["hidden_states"])
    if "top_k" in o:
        options.top_k = o["top_k"]
    request = pb.AnalyzeRequest(options=options, sequences=[pb.Sequence(text=workload.texts(1)[0])])
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        call = channel.unary_unary("/attention.v1.AttentionService/Analyze",
                                   request_serializer=pb.AnalyzeRequest.SerializeToString,
                                   response_deserializer=lambda raw: raw)
        return len(call(request, timeout=120))


def _cpus(cores: int) -> set[int]:
    import os

    available = sorted(os.sched_getaffinity(0))
    if len(available) < cores:
        raise SystemExit(f"capacity: needs {cores} CPUs, this process may use {len(available)}")
    return set(available[:cores])


def _run(server: Server, workload: Workload, seconds: float) -> dict[str, Any]:
    from bench.run import load

    before = server.cpu_seconds()
    result = load(server.target, workload, CALLERS, seconds)
    used = server.cpu_seconds() - before
    # Every call the load generator made (warm-up included) against the server's CPU over its whole run.
    result["server_cpu_ms_per_call"] = used * 1000 / result["calls"]
    return result


def measure(rounds: int, seconds: float, log: compare.Log) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {}
    rss: dict[str, dict[str, int]] = {}
    loads = [compare.loadavg()]
    servers = {c: Server("--instances", str(c), "--intra-op-threads", "1", cpus=_cpus(c)) for c in CORES}
    try:
        for server in servers.values():
            server.__enter__()
        sizes = {w.name: reply_bytes(servers[1].target, w) for w in CASES}
        for k in range(rounds):
            order = list(CORES) if k % 2 == 0 else list(reversed(CORES))
            for w in CASES:
                for c in order:
                    log(f"capacity round {k + 1}/{rounds}: {w.name}, server on {c} core(s)")
                    runs.setdefault(f"{w.name}_{c}core", []).append(_run(servers[c], w, seconds))
            loads.append(compare.loadavg())
        for c, server in servers.items():
            rss[f"{c}core"] = server.rss()
    finally:
        for server in servers.values():
            server.__exit__()
    return summarize({"rounds": rounds, "seconds_per_run": seconds, "callers": CALLERS, "loadavg": loads,
                      "runs": runs, "reply_bytes": sizes, "rss_kib": rss})


def summarize(cap: dict[str, Any]) -> dict[str, Any]:
    """Per workload: CPU per call (median over rounds) on each server, what one core serves, the planning rows."""
    per: dict[str, Any] = {}
    for w in CASES:
        tokens = w.lengths[0]
        cpu = {c: statistics.median(r["server_cpu_ms_per_call"] for r in cap["runs"][f"{w.name}_{c}core"])
               for c in CORES}
        one = cap["runs"][f"{w.name}_1core"]
        # Plan on the dearer of the two: more instances add thread hops and contention per call.
        planned = max(cpu.values())
        per_core_rps = 1000 / planned
        per[w.name] = {
            "tokens": tokens, "reply_bytes": cap["reply_bytes"][w.name],
            "cpu_ms_per_call": {str(c): cpu[c] for c in CORES},
            "cpu_ms_spread": {str(c): compare.spread([r["server_cpu_ms_per_call"]
                                                      for r in cap["runs"][f"{w.name}_{c}core"]]) for c in CORES},
            "two_cores_cpu_ratio": cpu[2] / cpu[1], "planned_cpu_ms_per_call": planned,
            "rps_per_core": per_core_rps, "tokens_per_s_per_core": per_core_rps * tokens,
            "wall_rps_1core": statistics.median(r["rps"] for r in one),
            "wall_rps_2core": statistics.median(r["rps"] for r in cap["runs"][f"{w.name}_2core"]),
            "p50_ms_1core": statistics.median(r["p50_ms"] for r in one),
            "plan": [plan(rate, planned, cap["reply_bytes"][w.name]) for rate in RATES],
        }
    cap["workloads"] = per
    one, two = cap["rss_kib"]["1core"], cap["rss_kib"]["2core"]
    per_instance = max(0, two["VmHWM"] - one["VmHWM"])
    cap["memory"] = {"peak_mib_1core": one["VmHWM"] / 1024, "peak_mib_2core": two["VmHWM"] / 1024,
                     "per_instance_mib": per_instance / 1024,
                     f"estimate_mib_{REPLICA_CORES}core": (one["VmHWM"] + (REPLICA_CORES - 1) * per_instance) / 1024}
    slowest = min(per.values(), key=lambda p: p["tokens_per_s_per_core"])
    replica_tokens = REPLICA_CORES * slowest["tokens_per_s_per_core"]
    cap["keda"] = {"replica_tokens_per_s": replica_tokens, "queue_seconds": QUEUE_SECONDS,
                   "threshold": int(round(replica_tokens * QUEUE_SECONDS, -2)),
                   "from": next(n for n, p in per.items() if p is slowest)}
    return cap


def plan(rate: int, cpu_ms_per_call: float, reply: int) -> dict[str, Any]:
    cores = rate * cpu_ms_per_call / 1000 / UTILIZATION
    return {"rate": rate, "cores": cores, "replicas": max(1, math.ceil(cores / REPLICA_CORES)),
            "mbit_per_s": rate * reply * 8 / 1e6}


def _bandwidth(mbit: float) -> str:
    return f"{mbit / 1000:.1f} Gbit/s" if mbit >= 1000 else f"{mbit:.1f} Mbit/s" if mbit >= 1 else \
        f"{mbit * 1000:.0f} kbit/s"


def planning_table(cap: dict[str, Any]) -> list[str]:
    """The table docs/scaling.md carries (a test checks it is this run's)."""
    lines = [f"| workload | req/s | cores at {UTILIZATION:.0%} | replicas of {REPLICA_CORES} cores | reply bandwidth |",
             "|---|---:|---:|---:|---:|"]
    for name, p in cap["workloads"].items():
        for row in p["plan"]:
            lines.append(f"| {LABELS[name]} | {row['rate']:,} | {row['cores']:,.1f} | {row['replicas']:,} | "
                         f"{_bandwidth(row['mbit_per_s'])} |")
    return lines


def per_core_table(cap: dict[str, Any]) -> list[str]:
    lines = ["| workload | reply bytes | server CPU ms/call, 1 core | 2 cores / 1 core | planned req/s per core | "
             "tokens/s per core | wall req/s, 1 core | wall req/s, 2 cores | p50 ms, 1 core |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, p in cap["workloads"].items():
        s = p["cpu_ms_spread"]["1"]
        lines.append(f"| {LABELS[name]} | {p['reply_bytes']:,} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | "
                     f"{p['two_cores_cpu_ratio']:.2f} | {p['rps_per_core']:,.0f} | "
                     f"{p['tokens_per_s_per_core']:,.0f} | {p['wall_rps_1core']:,.0f} | {p['wall_rps_2core']:,.0f} | "
                     f"{p['p50_ms_1core']:.1f} |")
    return lines


def markdown(cap: dict[str, Any], date: str) -> list[str]:
    m, keda = cap["memory"], cap["keda"]
    loads = cap["loadavg"]
    lines = ["", f"## Capacity per core ({date})", "",
             f"Servers pinned to 1 and to 2 cores (one single-threaded runtime instance a core), {cap['callers']} "
             f"callers through the SDK, {cap['rounds']} interleaved rounds of {cap['seconds_per_run']} s per "
             "workload and server; CPU per call is the server's (from /proc), median (min-max) over the rounds. "
             f"Load average at the start: {loads[0]}; at the end: {loads[-1]}.", ""]
    lines += per_core_table(cap)
    lines += ["", f"Memory: peak RSS {m['peak_mib_1core']:.0f} MiB on 1 core, {m['peak_mib_2core']:.0f} MiB on 2; "
              f"{m['per_instance_mib']:.0f} MiB more per runtime instance, so about "
              f"{m[f'estimate_mib_{REPLICA_CORES}core']:.0f} MiB for a {REPLICA_CORES}-core replica.",
              "", f"KEDA threshold: a {REPLICA_CORES}-core replica computes about {keda['replica_tokens_per_s']:,.0f} "
              f"tokens/s of the costliest workload ({LABELS[keda['from']]}), so {keda['queue_seconds']} s of queue is "
              f"{keda['threshold']:,} tokens.", ""]
    return lines + planning_table(cap)
