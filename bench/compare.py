"""A/B comparisons of `make bench`, each measured in interleaved rounds on servers
running side by side, so that the noise of a shared machine falls on both sides:

- `http_vs_grpc`: the Open Inference Protocol over gRPC (tritonclient.grpc) and
  over HTTP/REST (tritonclient.http, Triton binary tensor data; and JSON numbers
  for a small workload), against one server process;
- `tracing_cost`: two servers, tracing off and on (every call sampled, spans
  exported over OTLP/gRPC to bench.otlp_sink), through the client SDK.

Every measurement is a fresh load-generator process; the server's CPU over it is
read from /proc and divided by the calls it made. Ratios are taken within each
round (B / A of the same round), then summarized by their median and range."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.server import Server
from bench.workloads import ROOT

Log = Callable[[str], None]


def loadavg() -> str:
    """The 1, 5 and 15-minute load averages, as `uptime` prints them."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def measure(server: Server, argv: list[str]) -> dict[str, Any]:
    """One load-generator run (`python -m ...argv`) against `server`; its JSON line,
    with the server's CPU per call over the run (warm-up included)."""
    before = server.cpu_seconds()
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["server_cpu_ms_per_call"] = (server.cpu_seconds() - before) * 1000 / result["calls"]
    return result


def _summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    keys = ("rps", "p50_ms", "p99_ms", "server_cpu_ms_per_call", "client_cpu_ms_per_call")
    return {name: {k: spread([r[k] for r in rounds]) for k in keys if k in rounds[0]} for name, rounds in runs.items()}


def _ratio(runs: dict[str, list[dict[str, Any]]], b: str, a: str, key: str) -> dict[str, Any]:
    per_round = [rb[key] / ra[key] for rb, ra in zip(runs[b], runs[a], strict=True)]
    return {**spread(per_round), "per_round": per_round}


def _rounds(variants: dict[str, Callable[[float], dict[str, Any]]], groups: Sequence[Sequence[str]], rounds: int,
            log: Log) -> tuple[dict[str, list[dict[str, Any]]], list[str], dict[str, dict[str, Any]]]:
    """Run every group's variants once a round, each group's order rotated from one
    round to the next (A B, B A, ...) so neither side always runs first. A variant
    takes the fraction of its run time to use: first a third, once each, to warm
    up the fresh servers (returned apart), then the whole."""
    log("warm-up round (not in the figures)")
    warm = {name: variants[name](1 / 3) for group in groups for name in group}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    loads = []
    for r in range(rounds):
        loads.append(loadavg())
        log(f"round {r + 1}/{rounds} (load {loads[-1]})")
        for group in groups:
            shift = r % len(group)
            for name in [*group[shift:], *group[:shift]]:
                runs[name].append(variants[name](1.0))
    return runs, loads, warm


def http_vs_grpc(rounds: int, duration: float, log: Log) -> dict[str, Any]:
    """The heavy workload with 8 callers, and a small one with 1, over both
    transports of the Open Inference Protocol, on one server."""
    short = duration / 2

    def oip(server: Server, protocol: str, workload: str, concurrency: int, seconds: float,
            *extra: str) -> Callable[[float], dict[str, Any]]:
        url = server.target if protocol == "grpc" else server.http_url

        def run(fraction: float) -> dict[str, Any]:
            length = seconds * fraction
            return measure(server, ["bench.oip_loadgen", "--protocol", protocol, "--url", url, "--workload", workload,
                                    "--concurrency", str(concurrency), "--duration", f"{length:.2f}", "--warmup",
                                    f"{min(1.0, length / 3):.2f}", *extra])
        return run

    started = loadavg()
    with Server(http=True) as server:
        variants = {
            "heavy_grpc_c8": oip(server, "grpc", "heavy", 8, duration),
            "heavy_http_c8": oip(server, "http", "heavy", 8, duration),
            "small_grpc_c1": oip(server, "grpc", "small", 1, short),
            "small_http_c1": oip(server, "http", "small", 1, short),
            "small_http_json_c1": oip(server, "http", "small", 1, short, "--json-outputs"),
        }
        runs, loads, _ = _rounds(variants, [["heavy_grpc_c8", "heavy_http_c8"],
                                         ["small_grpc_c1", "small_http_c1", "small_http_json_c1"]], rounds, log)
    return {
        "rounds": rounds, "seconds_per_run": {"heavy": duration, "small": short}, "loadavg": [started, *loads,
                                                                                             loadavg()],
        "runs": runs, "summary": _summary(runs),
        "ratios": {
            "heavy, 8 callers: HTTP binary seq/s / gRPC seq/s": _ratio(runs, "heavy_http_c8", "heavy_grpc_c8", "rps"),
            "heavy, 8 callers: HTTP binary server CPU per call / gRPC": _ratio(
                runs, "heavy_http_c8", "heavy_grpc_c8", "server_cpu_ms_per_call"),
            "small, 1 caller: HTTP binary p50 / gRPC p50": _ratio(runs, "small_http_c1", "small_grpc_c1", "p50_ms"),
            "small, 1 caller: HTTP JSON p50 / HTTP binary p50": _ratio(
                runs, "small_http_json_c1", "small_http_c1", "p50_ms"),
            "small, 1 caller: HTTP JSON client CPU per call / HTTP binary": _ratio(
                runs, "small_http_json_c1", "small_http_c1", "client_cpu_ms_per_call"),
        },
    }


class Sink:
    """bench.otlp_sink in its own process: the collector the traced server exports to."""

    def __enter__(self) -> Sink:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("otlp-sink on "):
            self.__exit__()
            raise RuntimeError(f"the OTLP sink did not start: {line!r}")
        self.endpoint = "http://" + line.removeprefix("otlp-sink on ")
        return self

    def counts(self) -> dict[str, float]:
        """Spans and exports received so far, and the sink's own CPU seconds."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        spans, exports, cpu = self.proc.stdout.readline().split()
        return {"spans": int(spans), "exports": int(exports), "cpu_seconds": float(cpu)}

    def __exit__(self, *exc: object) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def tracing_env(endpoint: str) -> dict[str, str]:
    """Tracing on, the way a deployment with a collector next to it runs: every call
    sampled (always_on, not the ratio a busy production would pick: the worst
    case), the SDK's batch span processor with its defaults, and the OTLP/gRPC
    exporter, so the server pays for recording, batching, protobuf encoding and
    sending every span. Not the console exporter: its indented JSON per span is
    far costlier than any real exporter. Not an OTLP endpoint on a closed port:
    the exporter then sleeps in retry backoff while the batch queue fills and
    drops spans, so most spans would never be encoded. The local sink receives
    and counts them (a check that they were all sent) at little cost of its own."""
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
            "OTEL_TRACES_SAMPLER": "always_on", "OTEL_SERVICE_NAME": "attention-server-bench"}


def tracing_cost(rounds: int, duration: float, log: Log) -> dict[str, Any]:
    """Single-call latency (short, 1 client) and heavy throughput (8 clients)
    through the client SDK, on a server with tracing off and one with it on."""
    started = loadavg()

    def sdk(server: Server, workload: str, concurrency: int) -> Callable[[float], dict[str, Any]]:
        def run(fraction: float) -> dict[str, Any]:
            length = duration * fraction
            return measure(server, ["bench.loadgen", "--target", server.target, "--workload", workload,
                                    "--concurrency", str(concurrency), "--duration", f"{length:.2f}", "--warmup",
                                    f"{min(1.0, length / 3):.2f}"])
        return run

    with Sink() as sink:
        with Server() as off, Server(env=tracing_env(sink.endpoint)) as on:
            variants = {"short_c1_off": sdk(off, "short", 1), "short_c1_on": sdk(on, "short", 1),
                        "heavy_c8_off": sdk(off, "heavy", 8), "heavy_c8_on": sdk(on, "heavy", 8)}
            runs, loads, warm = _rounds(variants, [["short_c1_off", "short_c1_on"], ["heavy_c8_off", "heavy_c8_on"]],
                                        rounds, log)
        exported = sink.counts()  # after the traced server stopped, which flushed its last spans
    traced_calls = sum(r["calls"] for name in ("short_c1_on", "heavy_c8_on") for r in [*runs[name], warm[name]])
    return {
        "rounds": rounds, "seconds_per_run": duration, "loadavg": [started, *loads, loadavg()],
        "exporter": "otlp (gRPC) to bench.otlp_sink on localhost, sampler always_on, batch span processor defaults",
        "runs": runs, "summary": _summary(runs),
        "exported": {**exported, "traced_calls": traced_calls, "spans_per_call": exported["spans"] / traced_calls},
        "ratios": {
            "short, 1 client: p50 on / off": _ratio(runs, "short_c1_on", "short_c1_off", "p50_ms"),
            "short, 1 client: p99 on / off": _ratio(runs, "short_c1_on", "short_c1_off", "p99_ms"),
            "short, 1 client: server CPU per call on / off": _ratio(runs, "short_c1_on", "short_c1_off",
                                                                   "server_cpu_ms_per_call"),
            "heavy, 8 clients: seq/s on / off": _ratio(runs, "heavy_c8_on", "heavy_c8_off", "rps"),
            "heavy, 8 clients: server CPU per call on / off": _ratio(runs, "heavy_c8_on", "heavy_c8_off",
                                                                    "server_cpu_ms_per_call"),
        },
    }
