"""Single-caller latency of two or more clients measured call by call in turn:
one caller, one call at a time, A B, B A, ... (three clients: A B C, B C A, ...),
the same text for each client in a cycle. A client is a kind and an address:
`sdk` (attention.v1 through the client SDK), `grpc` (tritonclient.grpc), `http`
(tritonclient.http, binary outputs) or `http-json` (JSON outputs), each with the
pid of the server it calls. On a shared machine whatever else runs falls on
every client alike, at the scale of a call rather than of a run.

Per client: latency percentiles, this process's CPU per call, and the server's
CPU per call (from /proc at 10 ms resolution, summed over the calls: unbiased,
not exact). Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from attention_client import AttentionClient, tune_malloc
from bench.oip_loadgen import Caller
from bench.server import process_cpu_seconds
from bench.workloads import WORKLOADS, Workload

KINDS = ("sdk", "grpc", "http", "http-json")


def _client(kind: str, target: str, wl: Workload, texts: list[str]) -> tuple[Callable[[int], int], Callable[[], None]]:
    """call(i) -> tokens of the answer, and close()."""
    if kind == "sdk":
        client = AttentionClient(target, timeout=120)
        return (lambda i: len(client.analyze(texts[i % len(texts)], **wl.options).tokens)), client.close
    caller = Caller("grpc" if kind == "grpc" else "http", target, wl, texts, json_outputs=kind == "http-json")
    return (lambda i: caller.call(i)[0]), caller.close


def run(clients: list[tuple[str, str, int]], workload: str, duration: float, warmup: float) -> dict[str, Any]:
    wl = WORKLOADS[workload]
    texts = wl.texts(512, seed=1)
    made = [_client(kind, target, wl, texts) for kind, target, _ in clients]
    n = len(made)
    latency: list[list[float]] = [[] for _ in made]
    client_cpu = [0.0] * n
    server_cpu = [0.0] * n
    calls = [1] * n  # every call made, warm-up and the connecting one included
    try:
        for call, _ in made:
            call(0)  # connect
        warmup_until = time.perf_counter() + warmup
        stop_at = warmup_until + duration
        cycle = 0
        while time.perf_counter() < stop_at or cycle < 2:
            measured = time.perf_counter() >= warmup_until
            for k in [(cycle + j) % n for j in range(n)]:
                pid = clients[k][2]
                server0, cpu0, t0 = process_cpu_seconds(pid), time.process_time(), time.perf_counter()
                made[k][0](cycle + 1)
                t1, cpu1, server1 = time.perf_counter(), time.process_time(), process_cpu_seconds(pid)
                calls[k] += 1
                if measured:
                    latency[k].append(t1 - t0)
                    client_cpu[k] += cpu1 - cpu0
                    server_cpu[k] += server1 - server0
            cycle += 1
    finally:
        for _, close in made:
            close()
    out = []
    for k, (kind, target, _) in enumerate(clients):
        lat = np.array(latency[k]) * 1000
        out.append({"kind": kind, "target": target, "requests": len(lat), "calls": calls[k],
                    "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
                    "p99_ms": float(np.percentile(lat, 99)),
                    "client_cpu_ms_per_call": client_cpu[k] * 1000 / len(lat),
                    "server_cpu_ms_per_call": server_cpu[k] * 1000 / len(lat)})
    return {"workload": workload, "duration": duration, "clients": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--client", nargs=3, action="append", required=True, metavar=("KIND", "TARGET", "PID"),
                        help=f"KIND of {', '.join(KINDS)}; TARGET host:port; PID of its server (repeat: 2 or more)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args()
    if len(args.client) < 2 or any(kind not in KINDS for kind, _, _ in args.client):
        parser.error(f"give two or more --client, of kinds {', '.join(KINDS)}")
    tune_malloc()
    clients = [(kind, target, int(pid)) for kind, target, pid in args.client]
    print(json.dumps(run(clients, args.workload, args.duration, args.warmup)))


if __name__ == "__main__":
    main()
