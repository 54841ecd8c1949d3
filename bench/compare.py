"""A/B comparisons of `make bench`, on servers running side by side, in
interleaved rounds so that the noise of a shared machine falls on both sides:

- `http_vs_grpc`: the Open Inference Protocol over gRPC (tritonclient.grpc) and
  over HTTP/REST (tritonclient.http, Triton binary tensor data; and JSON numbers
  for a small workload), against one server process;
- `tracing_cost`: servers with tracing off and on (every call sampled, spans
  exported over OTLP/gRPC to bench.otlp_sink), through the client SDK.

Each round runs every throughput variant (8 callers) once, in a fresh load
generator, in an order that changes from round to round, with the server's CPU
over the run read from /proc and divided by the calls made; and one
single-caller run of bench.paired, which takes the clients in turn call by
call. Ratios are taken within each round (B / A of the same round), then
summarized by their median and range over the rounds."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

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


class Measured(Protocol):
    """A server process whose CPU time can be read: bench.server.Server, or a peer (bench.peers.servers)."""

    def cpu_seconds(self) -> float: ...


def measure(server: Measured, argv: list[str]) -> dict[str, Any]:
    """One load-generator run (`python -m ...argv`) against `server`; its JSON line,
    with the server's CPU per call over the run (warm-up included)."""
    before = server.cpu_seconds()
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["server_cpu_ms_per_call"] = (server.cpu_seconds() - before) * 1000 / result["calls"]
    return result


def measure_together(argvs: Sequence[list[str]]) -> list[dict[str, Any]]:
    """Load-generator runs started at the same time; their JSON lines."""
    procs = [subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for argv in argvs]
    outputs = [proc.communicate() for proc in procs]
    for argv, proc, (_, err) in zip(argvs, procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    return [json.loads(out) for out, _ in outputs]


def measure_paired(clients: Sequence[tuple[str, str, Server]], workload: str, seconds: float) -> dict[str, Any]:
    """One bench.paired run: (kind, target, its server) for each client. A client
    alone on its server gets the server's CPU over the whole run per call (its
    background work included, e.g. exporting spans) rather than bench.paired's
    CPU within its calls, which is what tells apart clients of one server."""
    argv = ["bench.paired", "--workload", workload, "--duration", f"{seconds:.2f}", "--warmup",
            f"{min(0.5, seconds / 3):.2f}"]
    for kind, target, server in clients:
        argv += ["--client", kind, target, str(server.proc.pid)]
    servers = [server for _, _, server in clients]
    before = [server.cpu_seconds() for server in servers]
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    for client, server, cpu in zip(result["clients"], servers, before, strict=True):
        client["server_cpu_per_call_over"] = "its calls"
        if servers.count(server) == 1:
            client["server_cpu_ms_per_call"] = (server.cpu_seconds() - cpu) * 1000 / client["calls"]
            client["server_cpu_per_call_over"] = "the whole run"
    return result


def _split(runs: dict[str, list[dict[str, Any]]], paired: str, names: dict[str, dict[str, Any]]) -> None:
    """The rounds of a paired variant as one variant per client, named in order,
    each client's figures with the fields given for its name."""
    for result in runs.pop(paired):
        for (name, fields), client in zip(names.items(), result["clients"], strict=True):
            runs.setdefault(name, []).append({"workload": result["workload"], "concurrency": 1, **fields, **client})


def _summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    keys = ("rps", "p50_ms", "p99_ms", "server_cpu_ms_per_call", "client_cpu_ms_per_call")
    return {name: {k: spread([r[k] for r in rounds]) for k in keys if k in rounds[0]} for name, rounds in runs.items()}


def _ratio(runs: dict[str, list[dict[str, Any]]], b: str, a: str | tuple[str, ...], key: str) -> dict[str, Any]:
    """B / A round by round; A may be several variants, of which the geometric mean
    is taken. None where A is 0 (a CPU time below the 10 ms resolution)."""
    names = (a,) if isinstance(a, str) else a
    per_round: list[float | None] = []
    for r, rb in enumerate(runs[b]):
        values = [runs[name][r][key] for name in names]
        per_round.append(rb[key] / float(np.prod(values)) ** (1 / len(values)) if all(values) else None)
    known = [x for x in per_round if x is not None]
    return {**(spread(known) if known else {"median": None, "min": None, "max": None}), "per_round": per_round}


def _rounds(variants: dict[str, Callable[[float], dict[str, Any]]], groups: Sequence[Sequence[str]], rounds: int,
            log: Log, warm_up: bool = True) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Run every group's variants once a round, each group's order rotated from one
    round to the next (A B, B A, ...) so neither side always runs first. A variant
    takes the fraction of its run time to use: first a third, once each, to warm
    up the new server (not kept; unless `warm_up` is False), then the whole."""
    if warm_up:
        log("warm-up round (not in the figures)")
        for name in [name for group in groups for name in group]:
            variants[name](1 / 3)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    loads = []
    for r in range(rounds):
        loads.append(loadavg())
        log(f"round {r + 1}/{rounds} (load {loads[-1]})")
        for group in groups:
            shift = r % len(group)
            for name in [*group[shift:], *group[:shift]]:
                runs[name].append(variants[name](1.0))
    return runs, loads


def http_vs_grpc(rounds: int, duration: float, log: Log) -> dict[str, Any]:
    """The heavy workload over both transports of the Open Inference Protocol, with
    8 callers on one and then the other, and with 4 on each at once; and a small
    one with 1 caller (gRPC, HTTP binary, HTTP JSON), on one server."""

    def heavy(server: Server, protocol: str, concurrency: int, fraction: float) -> list[str]:
        length = duration * fraction
        return ["bench.oip_loadgen", "--protocol", protocol, "--url",
                server.target if protocol == "grpc" else server.http_url, "--workload", "heavy", "--concurrency",
                str(concurrency), "--duration", f"{length:.2f}", "--warmup", f"{min(1.0, length / 3):.2f}"]

    started = loadavg()
    with Server(http=True) as server:
        small = [("grpc", server.target, server), ("http", server.http_url, server),
                 ("http-json", server.http_url, server)]
        variants: dict[str, Callable[[float], dict[str, Any]]] = {
            "heavy_grpc_c8": lambda fraction: measure(server, heavy(server, "grpc", 8, fraction)),
            "heavy_http_c8": lambda fraction: measure(server, heavy(server, "http", 8, fraction)),
            # 4 callers of each at the same time: the machine's load falls on both alike.
            "heavy_shared": lambda fraction: {"workload": "heavy", "clients": measure_together(
                [heavy(server, "grpc", 4, fraction), heavy(server, "http", 4, fraction)])},
            "small_paired": lambda fraction: measure_paired(small, "small", duration * fraction)}
        runs, loads = _rounds(variants, [["heavy_grpc_c8", "heavy_http_c8"], ["heavy_shared"], ["small_paired"]],
                                 rounds, log)
    _split(runs, "heavy_shared", {"heavy_grpc_c4_shared": {}, "heavy_http_c4_shared": {}})
    _split(runs, "small_paired", {"small_grpc_c1": {"protocol": "grpc", "outputs": "binary"},
                                  "small_http_c1": {"protocol": "http", "outputs": "binary"},
                                  "small_http_json_c1": {"protocol": "http", "outputs": "json"}})
    return {
        "rounds": rounds, "warm_up_round": True, "seconds_per_run": duration,
        "loadavg": [started, *loads, loadavg()], "runs": runs, "summary": _summary(runs),
        "ratios": {
            "heavy, 8 callers: HTTP binary seq/s / gRPC seq/s": _ratio(runs, "heavy_http_c8", "heavy_grpc_c8", "rps"),
            "heavy, 8 callers: HTTP binary server CPU per call / gRPC": _ratio(
                runs, "heavy_http_c8", "heavy_grpc_c8", "server_cpu_ms_per_call"),
            "heavy, 4 + 4 callers at once: HTTP binary seq/s / gRPC seq/s": _ratio(
                runs, "heavy_http_c4_shared", "heavy_grpc_c4_shared", "rps"),
            "small, 1 caller: HTTP binary p50 / gRPC p50": _ratio(runs, "small_http_c1", "small_grpc_c1", "p50_ms"),
            "small, 1 caller: HTTP JSON p50 / HTTP binary p50": _ratio(
                runs, "small_http_json_c1", "small_http_c1", "p50_ms"),
            "small, 1 caller: HTTP JSON server CPU per call / HTTP binary": _ratio(
                runs, "small_http_json_c1", "small_http_c1", "server_cpu_ms_per_call"),
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
    """Tracing on, as with a collector next to the server: every call sampled
    (always_on: the worst case, where production might sample a fraction), the
    SDK's batch span processor with its defaults, and the OTLP/gRPC exporter, so
    the server pays for recording, batching, encoding to protobuf and sending
    every span, and the receiving end (bench.otlp_sink) costs little and writes
    nothing. Not the console exporter: it formats each span as indented JSON,
    a cost no production exporter has, and its output would be the I/O measured.
    Not OTLP to a closed port: the SDK's exporter then spends up to its 10 s
    timeout per batch in retry backoff, logging a warning each time, while the
    batch queue fills and drops spans that are then never encoded or sent."""
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
            "OTEL_TRACES_SAMPLER": "always_on", "OTEL_SERVICE_NAME": "attention-server-bench"}


def tracing_cost(rounds: int, duration: float, log: Log) -> dict[str, Any]:
    """Single-call latency (short, 1 client) and heavy throughput (8 clients)
    through the client SDK, on a server with tracing on and two with it off.

    Identical servers started side by side have measured 20-50% apart on this
    machine, the same way through a whole run, in either direction (cause not
    known). So every round starts three new servers, in an order that rotates
    from round to round: such a difference then varies from round to round
    rather than biasing every round alike. The traced one is compared with the
    geometric mean of the two others, whose ratio (the control) shows how far
    apart two identical servers measure at the time."""
    started = loadavg()
    names = ("off", "on", "off2")

    def heavy(server: Server) -> dict[str, Any]:
        return measure(server, ["bench.loadgen", "--target", server.target, "--workload", "heavy", "--concurrency",
                                "8", "--duration", f"{duration:.2f}", "--warmup", f"{min(1.0, duration / 3):.2f}"])

    runs: dict[str, list[dict[str, Any]]] = {f"{w}_{n}": [] for w in ("short_c1", "heavy_c8") for n in names}
    loads, traced_calls = [], 0
    with Sink() as sink:
        for r in range(rounds):
            loads.append(loadavg())
            order = [*names[r % 3:], *names[:r % 3]]
            log(f"round {r + 1}/{rounds} (load {loads[-1]}), three new servers started in the order {', '.join(order)}")
            with contextlib.ExitStack() as stack:
                servers = {n: stack.enter_context(Server(env=tracing_env(sink.endpoint) if n == "on" else None))
                           for n in order}
                # Each run has a warm-up of its own (bench.paired, bench.loadgen) on the new servers.
                paired = measure_paired([("sdk", servers[n].target, servers[n]) for n in names], "short", duration)
                for n, client in zip(names, paired["clients"], strict=True):
                    runs[f"short_c1_{n}"].append({"workload": "short", "concurrency": 1, **client})
                for n in order:
                    runs[f"heavy_c8_{n}"].append(heavy(servers[n]))
            traced_calls += paired["clients"][1]["calls"] + runs["heavy_c8_on"][-1]["calls"]
        exported = sink.counts()  # every traced server has stopped, which flushed its last spans
    short_off, heavy_off = ("short_c1_off", "short_c1_off2"), ("heavy_c8_off", "heavy_c8_off2")
    return {
        "rounds": rounds, "warm_up_round": False, "seconds_per_run": duration,
        "loadavg": [started, *loads, loadavg()],
        "exporter": "otlp (gRPC) to bench.otlp_sink on localhost, sampler always_on, batch span processor defaults",
        "runs": runs, "summary": _summary(runs),
        "exported": {**exported, "traced_calls": traced_calls, "spans_per_call": exported["spans"] / traced_calls},
        "ratios": {
            "short, 1 client: p50 on / off": _ratio(runs, "short_c1_on", short_off, "p50_ms"),
            "short, 1 client: p99 on / off": _ratio(runs, "short_c1_on", short_off, "p99_ms"),
            "short, 1 client: server CPU per call on / off": _ratio(runs, "short_c1_on", short_off,
                                                                   "server_cpu_ms_per_call"),
            "heavy, 8 clients: seq/s on / off": _ratio(runs, "heavy_c8_on", heavy_off, "rps"),
            "heavy, 8 clients: server CPU per call on / off": _ratio(runs, "heavy_c8_on", heavy_off,
                                                                    "server_cpu_ms_per_call"),
            "control, short: p50 off2 / off (two servers without tracing)": _ratio(
                runs, "short_c1_off2", "short_c1_off", "p50_ms"),
            "control, short: server CPU per call, the same two": _ratio(
                runs, "short_c1_off2", "short_c1_off", "server_cpu_ms_per_call"),
            "control, heavy: seq/s, the same two": _ratio(runs, "heavy_c8_off2", "heavy_c8_off", "rps"),
        },
    }
