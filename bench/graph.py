"""Exported graphs side by side (issue 13, part 4: a faster graph, same numbers),
in interleaved rounds, against HF transformers eager with output_attentions=True.

- in-process: ONNX Runtime sessions over every graph given (wide: every core),
  run call by call in turn on the same inputs, 1 x 16 and 8 x 128 tokens, both
  outputs; HF eager takes its turn in the same rotation. The sessions are made anew
  each round, in an order that rotates: two sessions over one graph measured up to
  13% apart on this machine by the order they were made in alone.
- service (`--service`): a server per model folder, started anew each round in a
  rotating order; 1 client, 1 x 16 tokens (the *short* workload) through the SDK,
  the servers taken call by call in turn (bench.paired); 8 clients, 1 x 128 tokens
  with full attention (*heavy*), one run per server; HF eager 1 x 16 and batch 8 x
  128 in the same round. The issue's targets: HF time / service time >= 2 at
  1 x 16, service tokens/s / HF tokens/s >= 1.1 at 8 x 128.

Ratios are taken within each round, then summarized by their median and range.

    python -m bench.graph --graph old=/tmp/old/minilm-l6 --graph new=models/repository/minilm-l6 \\
        --graph int8=models/repository/minilm-l6-int8 --service old --service new
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.baselines import pad, tokenize
from bench.compare import loadavg, measure, measure_paired, spread
from bench.run import _ratios_markdown
from bench.server import Server
from bench.workloads import HEAVY, SHORT, text_of_length

OUTPUTS = ["last_hidden_state", "attentions"]
SHAPES = {"1x16": (1, 16), "8x128": (8, 128)}
Log = Callable[[str], None]


def _feeds(batch: int, tokens: int) -> list[dict[str, np.ndarray]]:
    ids = tokenize([text_of_length(tokens, k) for k in range(4 * batch)])
    return [pad(ids[i:i + batch]) for i in range(0, len(ids), batch)]


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()  # as the server's sessions and bench.baselines.OrtBaseline
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Hf:
    def __init__(self, threads: int = 0) -> None:
        import torch

        from bench.baselines import HfBaseline

        self.model = HfBaseline().model
        if threads:
            torch.set_num_threads(threads)

    def call(self, feed: dict[str, np.ndarray]) -> object:
        import torch

        return self.model(**{k: torch.from_numpy(v) for k, v in feed.items()}, output_attentions=True,
                          return_dict=True)


def in_process(graphs: dict[str, Path], hf: Hf | None, rounds: int, seconds: float, threads: int,
               log: Log) -> dict[str, Any]:
    """Per round and shape: each variant's median ms a call, taken call by call in turn.
    Single-threaded (`threads` 1) every call runs on this thread, and its CPU time is
    kept too (`cpu_ms`): what another process's load does not stretch."""
    names = [*graphs, *(["hf"] if hf else [])]
    runs: dict[str, dict[str, list[float]]] = {shape: {n: [] for n in names} for shape in SHAPES}
    cpu_runs: dict[str, dict[str, list[float]]] = {shape: {n: [] for n in names} for shape in SHAPES}
    loads = [loadavg()]
    feeds = {shape: _feeds(*dims) for shape, dims in SHAPES.items()}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        log(f"in-process round {r + 1}/{rounds} (load {loads[-1]}), sessions made in the order {order}")
        sessions = {n: _session(graphs[n], threads) for n in order if n != "hf"}
        calls: dict[str, Callable[[dict[str, np.ndarray]], object]] = {
            n: functools.partial(s.run, OUTPUTS) for n, s in sessions.items()}
        if hf:
            calls["hf"] = hf.call
        for shape, shape_feeds in feeds.items():
            times: dict[str, list[float]] = {n: [] for n in names}
            cpu: dict[str, list[float]] = {n: [] for n in names}
            for call in calls.values():
                call(shape_feeds[0])  # warm up
            stop_at, cycle = time.perf_counter() + seconds, 0
            while time.perf_counter() < stop_at or cycle < 3:
                for n in order[cycle % len(order):] + order[:cycle % len(order)]:
                    t, c = time.perf_counter(), time.thread_time()
                    calls[n](shape_feeds[cycle % len(shape_feeds)])
                    cpu[n].append(time.thread_time() - c)
                    times[n].append(time.perf_counter() - t)
                cycle += 1
            for n in names:
                runs[shape][n].append(float(np.median(times[n]) * 1000))
                cpu_runs[shape][n].append(float(np.median(cpu[n]) * 1000))
        del sessions, calls
        gc.collect()
        loads.append(loadavg())
    out = {"rounds": rounds, "seconds_per_shape": seconds, "threads": threads, "loadavg": loads, "ms": runs,
           "summary": {shape: {n: spread(v) for n, v in per.items()} for shape, per in runs.items()}}
    if threads == 1:
        out["cpu_ms"] = cpu_runs
    return out


def service(folders: dict[str, Path], hf: Hf | None, rounds: int, seconds: float, log: Log) -> dict[str, Any]:
    """Per round: new servers; short 1 client paired across them, heavy 8 clients one run each, HF."""
    names = list(folders)
    runs: dict[str, list[dict[str, Any]]] = {f"short_c1_{n}": [] for n in names}
    runs.update({f"heavy_c8_{n}": [] for n in names})
    if hf:
        runs.update({"hf_1x16": [], "hf_8x128": []})
    loads = [loadavg()]
    short_feeds = _feeds(1, 16)
    heavy_ids = tokenize(HEAVY.texts(64))
    heavy_feeds = [pad(heavy_ids[i:i + 8]) for i in range(0, 64, 8)]
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        log(f"service round {r + 1}/{rounds} (load {loads[-1]}), servers started in the order {order}")
        servers: dict[str, Server] = {}
        try:
            for n in order:
                folder = folders[n]
                servers[n] = Server("--model-repository", str(folder.parent), "--models", folder.name,
                                    "--default-model", folder.name).__enter__()
            paired = measure_paired([("sdk", servers[n].target, servers[n]) for n in order], SHORT.name, seconds)
            for n, client in zip(order, paired["clients"], strict=True):
                runs[f"short_c1_{n}"].append(client)
            for n in order:
                runs[f"heavy_c8_{n}"].append(measure(servers[n], [
                    "bench.loadgen", "--target", servers[n].target, "--workload", HEAVY.name, "--concurrency", "8",
                    "--duration", f"{seconds:.2f}", "--warmup", "1"]))
        finally:
            for s in servers.values():
                s.__exit__()
        if hf:
            hf.call(short_feeds[0])
            t = _timed(lambda i: hf.call(short_feeds[i % len(short_feeds)]), seconds)
            runs["hf_1x16"].append({"p50_ms": float(np.median(t) * 1000)})
            t = _timed(lambda i: hf.call(heavy_feeds[i % len(heavy_feeds)]), seconds)
            runs["hf_8x128"].append({"tokens_per_s": 8 * 128 / float(np.mean(t))})
        loads.append(loadavg())
    return {"rounds": rounds, "seconds_per_run": seconds, "loadavg": loads, "runs": runs}


def _timed(fn: Callable[[int], object], seconds: float) -> np.ndarray:
    times, i, stop_at = [], 0, time.perf_counter() + seconds
    while time.perf_counter() < stop_at or i < 3:
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
        i += 1
    return np.array(times)


def _ratio(values_b: list[float], values_a: list[float]) -> dict[str, Any]:
    per_round = [b / a for b, a in zip(values_b, values_a, strict=True)]
    return {**spread(per_round), "per_round": per_round}


def ratios(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    first = next(iter(out["graphs"]))
    for key in ("ms", "cpu_ms"):
        for shape, per in out.get("in_process", {}).get(key, {}).items():
            for n in out["graphs"]:
                if n != first:
                    rows[f"in-process {shape}: {first} {key} / {n} {key}"] = _ratio(per[first], per[n])
                if "hf" in per:
                    rows[f"in-process {shape}: HF eager {key} / {n} {key}"] = _ratio(per["hf"], per[n])
    if "service" in out:
        runs = out["service"]["runs"]
        names = out["services"]
        p50 = {n: [r["p50_ms"] for r in runs[f"short_c1_{n}"]] for n in names}
        tps = {n: [r["tokens_per_s"] for r in runs[f"heavy_c8_{n}"]] for n in names}
        for n in names[1:]:
            rows[f"service 1 x 16, 1 client: p50 {names[0]} / {n}"] = _ratio(p50[names[0]], p50[n])
            rows[f"service heavy, 8 clients: tokens/s {n} / {names[0]}"] = _ratio(tps[n], tps[names[0]])
        if "hf_1x16" in runs:
            hf_ms = [r["p50_ms"] for r in runs["hf_1x16"]]
            hf_tps = [r["tokens_per_s"] for r in runs["hf_8x128"]]
            for n in names:
                rows[f"target >= 2: HF eager 1 x 16 p50 / service {n} 1 client p50"] = _ratio(hf_ms, p50[n])
                rows[f"target >= 1.1: service {n} heavy 8 clients tokens/s / HF eager 8 x 128"] = _ratio(tps[n],
                                                                                                       hf_tps)
    return rows


def markdown(out: dict[str, Any]) -> str:
    lines = [f"Measured {out['date']} on {out['machine']}; graphs: "
             + ", ".join(f"{n} = {p}" for n, p in out["graphs"].items()) + "."]
    if "in_process" in out:
        ip = out["in_process"]
        threads = "every core" if not ip["threads"] else f"{ip['threads']} thread(s)"
        lines += ["", f"In-process ({threads}), {ip['rounds']} rounds of {ip['seconds_per_shape']} s a shape; load "
                  f"average at the start and after each round: {'; '.join(ip['loadavg'])}.", "",
                  "| shape | variant | ms a call, median (min-max) over rounds |", "|---|---|---:|"]
        for shape, per in ip["summary"].items():
            for n, s in per.items():
                lines.append(f"| {shape} | {n} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) |")
    if "service" in out:
        sv = out["service"]
        lines += ["", f"Service, {sv['rounds']} rounds of {sv['seconds_per_run']} s a run; load average at the start "
                  f"and after each round: {'; '.join(sv['loadavg'])}.", "",
                  "| run | p50 ms | tokens/s |", "|---|---:|---:|"]
        for name, rounds in sv["runs"].items():
            p50 = [r["p50_ms"] for r in rounds if "p50_ms" in r]
            tps = [r["tokens_per_s"] for r in rounds if "tokens_per_s" in r]
            lines.append(f"| {name} | {np.median(p50) if p50 else float('nan'):.2f} | "
                         f"{np.median(tps) if tps else float('nan'):.0f} |")
    lines += _ratios_markdown(out["ratios"])
    return "\n".join(lines)


def _named(value: str) -> tuple[str, Path]:
    name, _, path = value.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: give NAME=MODEL_FOLDER")
    return name, Path(path).resolve()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graph", type=_named, action="append", required=True, metavar="NAME=MODEL_FOLDER",
                        help="a model folder (model.json, model.onnx); the first is the reference of the ratios")
    parser.add_argument("--service", action="append", default=[], metavar="NAME",
                        help="also serve this --graph and measure it through the service (repeat)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement in a round")
    parser.add_argument("--no-hf", action="store_true", help="leave HF transformers eager out")
    parser.add_argument("--no-in-process", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="in-process threads (0: every core, as the server's wide session; 1: also CPU time)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    from bench.run import machine

    graphs = dict(args.graph)
    unknown = [n for n in args.service if n not in graphs]
    if unknown:
        parser.error(f"--service {unknown}: not a --graph name")
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    hf = None if args.no_hf else Hf(args.threads)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                           "graphs": {n: str(p) for n, p in graphs.items()}, "services": args.service}
    if not args.no_in_process:
        out["in_process"] = in_process({n: p / "model.onnx" for n, p in graphs.items()}, hf, args.rounds,
                                       args.seconds, args.threads, log)
    if args.service:
        out["service"] = service({n: graphs[n] for n in args.service}, hf, args.rounds, args.seconds, log)
    out["ratios"] = ratios(out)
    out["seconds"] = time.perf_counter() - started
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(out))
    log(f"done in {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
