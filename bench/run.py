"""`make bench`: the service against in-process ONNX Runtime and HF transformers,
measured side by side in one run on the real model; then the Open Inference
Protocol over HTTP against gRPC, and tracing on against off, each in interleaved
rounds (bench.compare); capacity per core (bench.capacity); and the peers, KServe
and MLServer, over the Open Inference Protocol (bench.peers). Prints a markdown
report with the ratios, writes bench/results/latest.json, latest.md and latest.png."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from attention_client import tune_malloc
from bench import capacity, compare, latency, shm, targets
from bench.baselines import HfBaseline, OrtBaseline, tokenize
from bench.peers import measure as peers
from bench.peers import report as peers_report
from bench.server import Server
from bench.workloads import HEAVY, MIXED, ROOT, SHORT, Workload, text_of_length

RESULTS = ROOT / "bench" / "results"


def load(target: str, workload: Workload, concurrency: int, duration: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--target", target, "--workload", workload.name,
         "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(min(1.0, duration / 3))],
        capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0))
    return f"{cpu}, {cores} cores, {platform.python_implementation()} {platform.python_version()}"


SECTIONS = ("service", "peers", "latency", "shm", "sweep", "http", "tracing", "capacity")
# What a plain `make bench` runs: every target of the performance issues (the peers'
# venvs come from `make bench-peers`, which `make bench` runs first). Only when named
# (`--only ...`, or `--all`): the sweeps, HTTP against gRPC, tracing on against off
# (about 3 minutes together) and capacity per core (about 3.5): with them a run is over
# the 10 minutes it should take.
DEFAULT_SECTIONS = ("service", "peers", "latency", "shm")
# What each section writes into latest.json.
SECTION_KEYS = {"service": ("service", "ort", "hf", "rss_kib", "ratios"), "sweep": ("sweep",), "http": ("http",),
                "tracing": ("tracing",), "capacity": ("capacity",), "peers": ("peers",), "latency": ("latency",),
                "shm": ("shm",)}
QUICK = {"duration": 1.5, "baseline_seconds": 1.0, "concurrency": [1, 8], "no_hf": True, "no_sweep": True,
         "rounds": 2, "round_seconds": 1.5, "peer_rounds": 1, "peer_seconds": 1.0}


def sections(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or value!r}: sections are {', '.join(SECTIONS)}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per service measurement")
    parser.add_argument("--baseline-seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sequence length / batch size sweeps")
    parser.add_argument("--only", type=sections, default=list(DEFAULT_SECTIONS),
                        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: "
                        f"{','.join(DEFAULT_SECTIONS)}); the others are kept, with their dates, from the --out "
                        "folder's latest.json")
    parser.add_argument("--all", action="store_true", help="every section")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the latency, shm, http, tracing and capacity comparisons")
    parser.add_argument("--round-seconds", type=float, default=3.0,
                        help="seconds per measurement in those rounds")
    parser.add_argument("--peer-rounds", type=int, default=3, help="interleaved rounds of the peers section")
    parser.add_argument("--peer-seconds", type=float, default=2.0,
                        help="seconds per measurement in the peers' rounds (13 measurements a round)")
    parser.add_argument("--quick", action="store_true",
                        help="a shorter run: --duration 1.5 --baseline-seconds 1 --concurrency 1 8 --no-hf --no-sweep "
                        "--rounds 2 --round-seconds 1.5 --peer-rounds 1 --peer-seconds 1, latency without the mixed "
                        "load (flags given as well win)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for latest.json/.md/.png")
    args = parser.parse_args()
    if args.quick:  # flags given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    only = list(SECTIONS) if args.all else args.only
    run = [s for s in only if not (s == "sweep" and args.no_sweep)]
    tune_malloc()  # this process is the client of the length sweep (see attention_client.memory)
    started = time.perf_counter()
    date = time.strftime("%Y-%m-%d %H:%M")
    out: dict[str, Any] = {"machine": machine(), "date": date, "dates": {}, "machines": {}}
    previous = args.out / "latest.json"
    if set(run) != set(SECTIONS) and previous.exists():
        kept = json.loads(previous.read_text())
        for name in SECTIONS:
            if name not in run and all(k in kept for k in SECTION_KEYS[name]):
                out.update({k: kept[k] for k in SECTION_KEYS[name]})
                out["dates"][name] = kept.get("dates", {}).get(name, kept["date"])
                out["machines"][name] = kept.get("machines", {}).get(name, kept["machine"])

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    if "service" in run or "sweep" in run:
        measure_service(out, args, run, log)
    if "http" in run:
        log("http: the Open Inference Protocol over gRPC and HTTP, interleaved rounds")
        out["http"] = compare.http_vs_grpc(args.rounds, args.round_seconds, log)
    if "tracing" in run:
        log("tracing: servers with tracing off and on, interleaved rounds")
        out["tracing"] = compare.tracing_cost(args.rounds, args.round_seconds, log)
    if "capacity" in run:
        log("capacity: servers pinned to 1 and 2 cores, interleaved rounds")
        out["capacity"] = capacity.measure(args.rounds, args.round_seconds, log)
    if "peers" in run:
        log("peers: KServe and MLServer over the Open Inference Protocol, interleaved rounds")
        out["peers"] = peers.measure(args.peer_rounds, args.peer_seconds, log)
    if "latency" in run:
        log("latency: single calls, 510 tokens, top-k, mixed load against in-process ORT, interleaved rounds")
        out["latency"] = latency.measure(args.rounds, args.quick, None, not args.quick, log)
    if "shm" in run:
        log("shm: heavy through system shared memory, the wire and in-process ORT, interleaved rounds")
        out["shm"] = shm.measure(args.rounds, args.round_seconds, min(1.0, args.round_seconds / 2))
    for name in run:
        out["dates"][name] = date
        out["machines"][name] = out["machine"]
    out["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(out, indent=2) + "\n")
    report = markdown(out)
    (args.out / "latest.md").write_text(report + "\n")
    print(report)
    if "service" in run:
        try:
            from bench.plot import plot

            plot(out, args.out / "latest.png")
            log(f"wrote {args.out / 'latest.png'}")
        except ImportError as exc:
            log(f"no plot ({exc}); install requirements/bench.txt")
    log(f"done in {out['seconds']:.0f} s")
    return 0


def measure_service(out: dict[str, Any], args: argparse.Namespace, run: list[str],
                    log: compare.Log) -> None:
    """The service through the SDK against the in-process baselines, memory, and
    the sweeps (the sections `service` and `sweep`)."""
    ort = OrtBaseline()
    secs = args.baseline_seconds
    with Server() as server:
        if "service" in run:
            out.update({"service": {}, "ort": {}, "hf": {}, "rss_kib": {}})
            hf = None if args.no_hf else HfBaseline()
            ids = {w.name: tokenize(w.texts(256)) for w in (SHORT, HEAVY, MIXED)}
            for wl in (SHORT, HEAVY, MIXED):
                # The in-process references right before the service runs the same inputs.
                log(f"{wl.name}: in-process ONNX Runtime")
                seqs = ids[wl.name]
                out["ort"][f"{wl.name}_b1"] = ort.run([[s] for s in seqs], wl.outputs, secs)
                if wl is SHORT:
                    out["ort"]["short_b32"] = ort.run([seqs[i:i + 32] for i in range(0, 256, 32)], wl.outputs, secs)
                if wl is HEAVY:
                    out["ort"]["heavy_b8"] = ort.run([seqs[i:i + 8] for i in range(0, 256, 8)], wl.outputs, secs)
                if hf is not None and wl is SHORT:
                    log("short: HF transformers eager")
                    out["hf"]["b1x16"] = hf.run([[s] for s in seqs], secs)
                if hf is not None and wl is HEAVY:
                    log("heavy: HF transformers eager")
                    out["hf"]["b8x128"] = hf.run([seqs[i:i + 8] for i in range(0, 256, 8)], secs)
                for c in args.concurrency:
                    log(f"{wl.name}: service, {c} concurrent clients")
                    out["service"][f"{wl.name}_c{c}"] = load(server.target, wl, c, args.duration)
                out["rss_kib"][f"server_after_{wl.name}"] = server.rss()

        if "sweep" in run:
            log("sweep: cost against sequence length and batch size")
            sweep: dict[str, Any] = {"length": {}, "batch": {}}
            for n in (16, 32, 64, 128, 256, 512):
                wl = Workload(f"len{n}", "", (n,), {"attention": True, "hidden_states": True})
                seq = tokenize([text_of_length(n, 1)])
                ort_one = ort.run([seq], wl.outputs, secs / 3)
                svc = _service_once(server.target, text_of_length(n, 1), 8 if n <= 128 else 4)
                sweep["length"][n] = {"ort_ms": ort_one["p50_ms"], "service_ms": svc}
            for n in (16, 128):
                seqs = tokenize([text_of_length(n, k) for k in range(32)])
                for b in (1, 2, 4, 8, 16, 32):
                    r = ort.run([seqs[:b]], ["last_hidden_state", "attentions"], secs / 4)
                    sweep["batch"][f"{n}x{b}"] = {"ms": r["p50_ms"], "tokens_per_s": r["tokens_per_s"]}
            out["sweep"] = sweep

    if "service" in run:
        log("RSS reference: a fresh process with one ORT session running the heavy batches")
        ref = subprocess.run([sys.executable, "-m", "bench.ort_rss", "1", "8", "32"], capture_output=True, text=True,
                             cwd=ROOT, check=True)
        out["rss_kib"]["ort_in_process"] = json.loads(ref.stdout)
        out["ratios"] = ratios(out)


def _service_once(target: str, text: str, repeats: int) -> float:
    """Median ms of one full-attention call through the SDK (1 client)."""
    import numpy as np

    from attention_client import AttentionClient

    with AttentionClient(target, timeout=120) as client:
        client.analyze(text)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            client.analyze(text)
            times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def ratios(out: dict[str, Any]) -> list[dict[str, Any]]:
    s, o, h = out["service"], out["ort"], out["hf"]
    rows = []

    def add(name: str, value: float | None, target: str, ok: bool | None) -> None:
        rows.append({"ratio": name, "value": float(value), "target": target, "met": bool(ok)})

    if "heavy_c8" in s:
        v = s["heavy_c8"]["tokens_per_s"] / o["heavy_b8"]["tokens_per_s"]
        add("heavy, 8 clients: service tokens/s / in-process ORT batch 8", v, ">= 0.85", v >= 0.85)
    if "short_c32" in s:
        v = s["short_c32"]["rps"] / o["short_b1"]["sequences_per_s"]
        add("short, 32 clients: service req/s / loop of ORT batch-1 calls", v, ">= 1.8", v >= 1.8)
    if "short_c1" in s:
        v = s["short_c1"]["p50_ms"] / o["short_b1"]["p50_ms"]
        add("short, 1 client: service p50 / one ORT batch-1 call (p50)", v, "<= 1.3", v <= 1.3)
        v = s["short_c1"]["p99_ms"] / o["short_b1"]["p50_ms"]
        add("short, 1 client: service p99 / one ORT batch-1 call (p50)", v, "<= 2", v <= 2)
        if "b1x16" in h:
            v = h["b1x16"]["p50_ms"] / s["short_c1"]["p50_ms"]
            add("1 x 16 tokens: HF eager in-process time / service time through gRPC", v, ">= 2", v >= 2)
    if "heavy_c8" in s and "b8x128" in h:
        v = s["heavy_c8"]["tokens_per_s"] / h["b8x128"]["tokens_per_s"]
        add("8 x 128 tokens: service tokens/s (8 clients) / HF eager batch 8", v, ">= 1.1", v >= 1.1)
    rss = out["rss_kib"]
    if "server_after_heavy" in rss:
        v = rss["server_after_heavy"]["VmRSS"] / rss["ort_in_process"]["VmRSS"]
        add("server RSS after heavy / in-process ORT session RSS", v, "<= 1.5", v <= 1.5)
    return rows


def markdown(out: dict[str, Any]) -> str:
    present = [name for name in SECTIONS if out.get(SECTION_KEYS[name][0])]
    dates = {name: out.get("dates", {}).get(name, out["date"]) for name in present}
    machines = {name: out.get("machines", {}).get(name, out["machine"]) for name in present}
    runs: dict[tuple[str, str], list[str]] = {}
    for name in present:  # the sections of each run, in order
        runs.setdefault((dates[name], machines[name]), []).append(name)
    lines = ["Measured: " + "; ".join(f"{', '.join(names)} {d} on {m}" for (d, m), names in runs.items()) + "."]
    lines += targets.markdown(out)
    if out.get("peers"):
        lines += peers_report.markdown(out["peers"], dates["peers"])
    if out.get("latency"):
        lines += ["", *latency.markdown({**out["latency"], "date": dates["latency"]})]
    if out.get("shm"):
        lines += ["", f"## Shared memory against the wire ({dates['shm']})", "", *shm.table(out["shm"])]
    if out.get("service"):
        lines += _service_markdown(out, dates["service"])
    if out.get("sweep"):
        lines += ["", f"## Sequence length and batch size ({dates['sweep']})", "",
                  "| tokens | ORT batch-1 ms | service ms (full attention, 1 client) | service / ORT |",
                  "|---:|---:|---:|---:|"]
        for n, r in out["sweep"]["length"].items():
            lines.append(f"| {n} | {r['ort_ms']:.1f} | {r['service_ms']:.1f} | {r['service_ms'] / r['ort_ms']:.2f} |")
        lines += ["", "| tokens x batch | ORT ms | ORT tokens/s |", "|---|---:|---:|"]
        for k, r in out["sweep"]["batch"].items():
            lines.append(f"| {k} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} |")
    if out.get("http"):
        lines += _http_markdown(out["http"], dates["http"])
    if out.get("tracing"):
        lines += _tracing_markdown(out["tracing"], dates["tracing"])
    if out.get("capacity"):
        lines += capacity.markdown(out["capacity"], dates["capacity"])
    return "\n".join(lines)


def _service_markdown(out: dict[str, Any], date: str) -> list[str]:
    lines = ["", f"## The service through the SDK, and the in-process references ({date})", "",
             "| workload | clients | req/s | tokens/s | MB/s | p50 ms | p90 ms | p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["service"].values():
        lines.append(f"| {r['workload']} | {r['concurrency']} | {r['rps']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['mb_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} |")
    lines += ["", "| in-process reference | calls | p50 ms | p99 ms | tokens/s |", "|---|---:|---:|---:|---:|"]
    for key, r in out["ort"].items():
        lines.append(f"| ONNX Runtime {key} | {r['calls']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['tokens_per_s']:.0f} |")
    for key, r in out["hf"].items():
        lines.append(f"| HF eager {key} | {r['calls']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['tokens_per_s']:.0f} |")
    lines += ["", "| RSS | MiB (peak MiB) |", "|---|---:|"]
    for key, r in out["rss_kib"].items():
        lines.append(f"| {key} | {r['VmRSS'] / 1024:.0f} ({r['VmHWM'] / 1024:.0f}) |")
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---|---|"]
    for r in out["ratios"]:
        lines.append(f"| {r['ratio']} | {r['value']:.2f} | {r['target']} | {'yes' if r['met'] else 'NO'} |")
    return lines


def _spread(s: dict[str, float] | None, digits: int = 1) -> str:
    """median (min-max)"""
    if s is None:
        return ""
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _rounds_markdown(section: dict[str, Any]) -> list[str]:
    loads = section["loadavg"]
    after = " after a warm-up round" if section.get("warm_up_round", True) else ""
    return ["", f"{section['rounds']} rounds{after}; each figure is the median over the rounds, the "
            f"range (min-max) in brackets. Load average (1, 5, 15 min) at the start: {loads[0]}; at each round: "
            f"{'; '.join(loads[1:-1])}; at the end: {loads[-1]}."]


def _ratios_markdown(ratios: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["", "| ratio, within each round | median | min-max | per round |", "|---|---:|---:|---|"]
    for name, r in ratios.items():
        if r["median"] is None:
            lines.append(f"| {name} | - | - | |")
            continue
        lines.append(f"| {name} | {r['median']:.2f} | {r['min']:.2f}-{r['max']:.2f} | "
                     f"{', '.join('-' if x is None else f'{x:.2f}' for x in r['per_round'])} |")
    return lines


def _http_markdown(http: dict[str, Any], date: str) -> list[str]:
    lines = ["", f"## Open Inference Protocol: HTTP/REST against gRPC ({date})", "",
             "One server; tritonclient.grpc and tritonclient.http (binary outputs; JSON numbers where said), text "
             "in, `last_hidden_state` and `attentions` out (float32). heavy: 8 threads x 1 x 128 tokens, one client "
             f"object each, a run of {http['seconds_per_run']} s per transport in each round, in alternating order; "
             "then 4 threads of each at the same time (`shared`, no server CPU per call: it serves both). "
             "small: 1 x 16 tokens, one caller taking the three clients in turn call by call "
             f"({http['seconds_per_run']} s a round), its server CPU counted within each client's calls. CPU per "
             "call: the server process's, and the load generator's."]
    lines += _rounds_markdown(http)
    lines += ["", "| workload | protocol | outputs | callers | seq/s | p50 ms | p99 ms | server CPU ms/call | "
              "client CPU ms/call |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in http["summary"].items():
        r = http["runs"][name][0]
        shared = " (shared)" if name.endswith("_shared") else ""
        lines.append(f"| {r['workload']} | {r['protocol']}{shared} | {r['outputs']} | {r['concurrency']} | "
                     f"{_spread(s.get('rps'))} | {_spread(s['p50_ms'])} | {_spread(s['p99_ms'])} | "
                     f"{_spread(s.get('server_cpu_ms_per_call'))} | {_spread(s.get('client_cpu_ms_per_call'), 2)} |")
    return lines + _ratios_markdown(http["ratios"])


def _tracing_markdown(tracing: dict[str, Any], date: str) -> list[str]:
    exported = tracing["exported"]
    lines = ["", f"## Tracing off and on ({date})", "",
             "Three servers side by side, the same but for tracing (off, on, off2), new ones in each round, "
             f"started in an order that rotates: {tracing['exporter']}. Through the client SDK. short: one caller "
             f"taking the three in turn, call by call ({tracing['seconds_per_run']} s a round). heavy: 8 callers, a "
             f"run of {tracing['seconds_per_run']} s per server in each round, in the order they started. On / off "
             "is on over the geometric mean of off and off2; the control compares those two. Server CPU per call: "
             "over the whole run, background "
             f"export included. The traced server exported {exported['spans']} spans in {exported['exports']} "
             f"exports for {exported['traced_calls']} calls ({exported['spans_per_call']:.2f} spans a call); the "
             f"sink used {exported['cpu_seconds']:.1f} s of CPU."]
    lines += _rounds_markdown(tracing)
    lines += ["", "| workload | clients | tracing | seq/s | p50 ms | p99 ms | server CPU ms/call |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for name, s in tracing["summary"].items():
        r = tracing["runs"][name][0]
        tracing_label = name.rsplit("_", 1)[1]
        lines.append(f"| {r['workload']} | {r['concurrency']} | {tracing_label} | {_spread(s.get('rps'))} | "
                     f"{_spread(s['p50_ms'], 2)} | {_spread(s['p99_ms'], 2)} | "
                     f"{_spread(s['server_cpu_ms_per_call'], 2)} |")
    return lines + _ratios_markdown(tracing["ratios"])


if __name__ == "__main__":
    sys.exit(main())
