"""Latency and copies, side by side in one run (issue 13, part 2): the service as
committed (`--before`, default HEAD, taken with `git archive` into a temporary
folder: the repository is not touched) against the working tree, and both against
in-process ONNX Runtime on the same token ids.

    .venv-dev/bin/python -m bench.latency [--rounds 5] [--quick]

Each variant (ort, before, after) is one long-lived worker process, so the client
SDK's decoding is each tree's own; the two servers run side by side for the whole
run. Rounds are interleaved case by case, the order rotating; ratios are taken
within a round (service / ORT of the same round), then the median over rounds.

Cases:
- short: 1 x 16 tokens, full float32 attention and hidden states, one caller; p50
  and p99 against ORT's p50 (targets 1.3 and 2).
- full512: 510 tokens, full float32 attention and hidden states, unary, until the
  arrays are in the caller's hands (target 1.6 x ORT).
- topk512: 510 tokens, attention=False, hidden_states=False, top_k=5 (also with
  exclude_special_tokens): against ORT's run of the attention output (target 1.2).
- mixed: the `mixed` workload (8-256 tokens, top-5 pairs, hidden states) at 8, 32
  and 64 clients, counted as completions within the window (see `mixed`); req/s at
  32 and 64 over req/s at 8 (target >= 1).
- copies: what one 75 MB copy costs in this process (a join, an array copy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LONG = 510
FULL = {"attention": True, "hidden_states": True}
TOPK = {"attention": False, "hidden_states": False, "top_k": 5}
TOPK_EXCLUDE = TOPK | {"exclude_special_tokens": True}


# -- the worker: one variant, commands on stdin, one JSON line each on stdout ----------


def _texts(tokens: int, count: int) -> list[str]:
    from bench.workloads import text_of_length

    return [text_of_length(tokens, 1000 + i) for i in range(count)]


class OrtWorker:
    def __init__(self) -> None:
        import onnxruntime as ort

        from bench.baselines import pad, tokenize
        from bench.workloads import MODEL_DIR

        options = ort.SessionOptions()
        options.intra_op_num_threads = 0
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(MODEL_DIR / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.feeds = {n: [pad([ids]) for ids in tokenize(_texts(n, 8))] for n in (16, LONG)}

    def times(self, tokens: int, outputs: list[str], seconds: float, calls: int) -> list[float]:
        feeds = self.feeds[tokens]
        self.session.run(outputs, feeds[0])
        out: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(out) < calls:
            started = time.perf_counter()
            self.session.run(outputs, feeds[len(out) % len(feeds)])
            out.append(time.perf_counter() - started)
        return out

    def case(self, name: str, seconds: float, calls: int) -> dict[str, Any]:
        if name == "short":
            return {"times": self.times(16, ["attentions", "last_hidden_state"], seconds, calls)}
        if name == "full512":
            return {"times": self.times(LONG, ["attentions", "last_hidden_state"], seconds, calls)}
        if name in ("topk512", "topk512x"):
            return {"times": self.times(LONG, ["attentions"], seconds, calls)}
        return {}


class ServiceWorker:
    def __init__(self, target: str) -> None:
        from attention_client import AttentionClient, tune_malloc

        tune_malloc()
        self.target = target
        self.client = AttentionClient(target, timeout=300)
        self.texts = {n: _texts(n, 8) for n in (16, LONG)}

    def times(self, tokens: int, options: dict[str, Any], seconds: float, calls: int) -> list[float]:
        texts = self.texts[tokens]
        self.client.analyze(texts[0], **options)
        out: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(out) < calls:
            started = time.perf_counter()
            result = self.client.analyze(texts[len(out) % len(texts)], **options)
            _ = (result.attention, result.hidden_states, result.pairs)  # in the caller's hands
            out.append(time.perf_counter() - started)
        return out

    def case(self, name: str, seconds: float, calls: int) -> dict[str, Any]:
        if name == "short":
            return {"times": self.times(16, FULL, seconds, calls)}
        if name == "full512":
            return {"times": self.times(LONG, FULL, seconds, calls)}
        if name == "topk512":
            return {"times": self.times(LONG, TOPK, seconds, calls)}
        if name == "topk512x":
            return {"times": self.times(LONG, TOPK_EXCLUDE, seconds, calls)}
        if name.startswith("mixed"):
            return asyncio.run(mixed(self.target, int(name[5:]), seconds, WARMUP))
        raise ValueError(name)


WARMUP = 2.0


async def mixed(target: str, clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    """Closed loop of the `mixed` workload: sequences completed within a window of
    `seconds` after `warmup`, whenever their call started. (bench.loadgen counts the
    calls started in the window over the time until the last of them ends: with
    32-64 callers a call takes a good part of the window, and that rate reads low by
    about latency / (window + latency).)"""
    from attention_client import AsyncAttentionClient
    from bench.workloads import MIXED

    texts = MIXED.texts(256, seed=clients)
    done: list[float] = []
    async with AsyncAttentionClient(target, timeout=300) as client:
        await client.analyze(texts[0], **MIXED.options)
        start = time.perf_counter() + warmup
        stop = start + seconds

        async def caller(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                await client.analyze(texts[i % len(texts)], **MIXED.options)
                done.append(time.perf_counter())
                i += clients

        await asyncio.gather(*(caller(k) for k in range(clients)))
    counted = sum(1 for t in done if start <= t < stop)
    return {"rps": counted / seconds, "completed": counted}


def worker(variant: str, target: str) -> None:
    impl: OrtWorker | ServiceWorker = OrtWorker() if variant == "ort" else ServiceWorker(target)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        name, seconds, calls = line.split()
        cpu = time.process_time()
        result = impl.case(name, float(seconds), int(calls))
        result["client_cpu_s"] = time.process_time() - cpu
        print(json.dumps(result), flush=True)


# -- the driver -------------------------------------------------------------------------


class Worker:
    def __init__(self, variant: str, target: str, pythonpath: str | None) -> None:
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.latency", "--worker", variant, "--target", target],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("worker died")
        result: dict[str, Any] = json.loads(line)
        return result

    def case(self, name: str, seconds: float, calls: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{name} {seconds} {calls}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


def _p(times: list[float], q: float) -> float:
    return float(np.percentile(np.array(times) * 1000, q))


def copies(megabytes: int = 75, repeats: int = 7) -> dict[str, float]:
    """Milliseconds one copy of a result this large costs here (median), with the
    allocator settings the server and the bench clients use."""
    from attention_client import tune_malloc

    tune_malloc()
    array = np.random.default_rng(0).random(megabytes * (1 << 20) // 4, dtype=np.float32)
    parts: list[bytes | memoryview] = [b"x" * 300, array.view(np.uint8).data, b"y" * 64]
    out: dict[str, list[float]] = {"join": [], "array_copy": [], "bytes_of_view": []}
    for _ in range(repeats):
        for name, fn in (("join", lambda: b"".join(parts)), ("array_copy", array.copy),
                         ("bytes_of_view", lambda: bytes(array.view(np.uint8).data))):
            started = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - started)
    return {k: 1000 * statistics.median(v) for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="HEAD",
                        help="git revision of the 'before' service (default HEAD; 'none': the working tree alone)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 rounds, shorter runs")
    parser.add_argument("--no-mixed", action="store_true", help="leave out the mixed-load throughput")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.target)
        return 0
    before = None if args.before == "none" else args.before
    figures = measure(3 if args.quick else args.rounds, args.quick, before, not args.no_mixed,
                      lambda msg: print(msg, file=sys.stderr, flush=True))
    report(figures)
    if args.out:
        args.out.write_text(json.dumps(figures))
    return 0


def measure(rounds: int, quick: bool, before: str | None, with_mixed: bool, log: Any) -> dict[str, Any]:
    """The cases in interleaved rounds: in-process ORT, the working tree's service, and,
    with `before`, the service at that git revision side by side."""
    from bench.server import Server

    short_s, long_calls, mixed_s = (1.0, 3, 3.0) if quick else (2.0, 4, 4.0)
    cases = [("short", short_s, 50), ("full512", 0.0, long_calls), ("topk512", 0.0, long_calls),
             ("topk512x", 0.0, long_calls)]
    if with_mixed:
        cases += [(f"mixed{c}", mixed_s, 1) for c in (8, 32, 64)]
    started = time.time()
    load = [os.getloadavg()]
    with contextlib.ExitStack() as stack:
        servers = {"after": stack.enter_context(Server())}
        workers = {"ort": Worker("ort", "", None), "after": Worker("after", servers["after"].target, None)}
        if before is not None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="latency-before-"))
            archive = subprocess.run(["git", "archive", before, "server", "client"], cwd=ROOT, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            before_path = f"{tmp}/server:{tmp}/client"
            servers["before"] = stack.enter_context(Server(env={"PYTHONPATH": before_path}))
            workers["before"] = Worker("before", servers["before"].target, before_path)
        for w in workers.values():
            stack.callback(w.close)
        results: dict[str, dict[str, list[dict[str, Any]]]] = {c: {v: [] for v in workers} for c, _, _ in cases}
        for r in range(rounds):
            for name, seconds, calls in cases:
                order = list(workers)
                order = order[r % len(order):] + order[:r % len(order)]
                for variant in order:
                    if variant == "ort" and name.startswith("mixed"):
                        continue
                    server = servers.get(variant)
                    cpu = server.cpu_seconds() if server is not None else 0.0
                    result = workers[variant].case(name, seconds, calls)
                    result["server_cpu_s"] = server.cpu_seconds() - cpu if server is not None else 0.0
                    results[name][variant].append(result)
            load.append(os.getloadavg())
            log(f"latency: round {r + 1}/{rounds} done, load {load[-1][0]:.2f}")
    copy_ms = copies()
    load.append(os.getloadavg())
    return {"results": results, "copies_ms": copy_ms, "load": load, "rounds": rounds,
            "seconds": time.time() - started, "before": before, "targets": targets(results)}


# (case, label, percentile of the service's times, target: service / ORT p50 <= target)
ROWS = [("short", "1 x 16, full attention: p50", 50, 1.3),
        ("short", "1 x 16, full attention: p99 / ORT p50", 99, 2.0),
        ("full512", f"1 x {LONG}, full float32 attention, unary", 50, 1.6),
        ("topk512", f"1 x {LONG}, top_k=5 only", 50, 1.2),
        ("topk512x", f"1 x {LONG}, top_k=5 only, exclude_special_tokens", 50, 1.2)]


def _ratios(results: dict[str, dict[str, list[dict[str, Any]]]], case: str, variant: str, q: int) -> list[float]:
    ort = [_p(x["times"], 50) for x in results[case]["ort"]]
    mine = [_p(x["times"], q) for x in results[case][variant]]
    return [m / o for m, o in zip(mine, ort, strict=True)]


def _mixed_ratios(results: dict[str, dict[str, list[dict[str, Any]]]], variant: str, clients: int) -> list[float]:
    return [a["rps"] / b["rps"] for a, b in zip(results[f"mixed{clients}"][variant], results["mixed8"][variant],
                                                   strict=True)]


def targets(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The working tree's targets, judged on the median of the per-round ratios."""
    rows = []
    for case, label, q, target in ROWS:
        ratios = _ratios(results, case, "after", q)
        value = statistics.median(ratios)
        rows.append({"ratio": f"{label}: service / in-process ORT", "value": value, "min": min(ratios),
                     "max": max(ratios), "target": f"<= {target}", "met": value <= target})
    if "mixed8" in results:
        for clients in (32, 64):
            ratios = _mixed_ratios(results, "after", clients)
            value = statistics.median(ratios)
            rows.append({"ratio": f"mixed lengths: req/s at {clients} clients / at 8", "value": value,
                         "min": min(ratios), "max": max(ratios), "target": ">= 1", "met": value >= 1})
    return rows


def _median_spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def report(figures: dict[str, Any]) -> None:
    print("\n".join(markdown(figures)))


def markdown(figures: dict[str, Any], heading: str = "##") -> list[str]:
    results, load, before = figures["results"], figures["load"], figures["before"]
    variants = ["before", "after"] if before is not None else ["after"]
    names = {"before": f"before ({before})", "after": "service" if before is None else "after (working tree)"}
    lines = [f"{heading} Latency and copies: {' / '.join(names[v] for v in variants)} / in-process ORT, "
             f"{figures['rounds']} interleaved rounds, {figures['seconds']:.0f} s ({figures.get('date', 'now')})",
             "", "Load average (1, 5, 15 min): " + "; ".join(" ".join(f"{x:.2f}" for x in entry) for entry in load),
             "", "| case | ORT p50 ms | " + " | ".join(f"{names[v]} p50 ms" for v in variants) + " | "
             + " | ".join(f"{names[v]} / ORT" for v in variants) + " | target |",
             "|---|---:|" + "---:|" * (2 * len(variants)) + "---|"]
    for case, label, q, target in ROWS:
        ort = [_p(x["times"], 50) for x in results[case]["ort"]]
        line = [label, f"{statistics.median(ort):.1f}"]
        line += [f"{statistics.median([_p(x['times'], q) for x in results[case][v]]):.1f}" for v in variants]
        line += [_median_spread(_ratios(results, case, v, q)) for v in variants]
        met = "met" if statistics.median(_ratios(results, case, "after", q)) <= target else "NOT met"
        line.append(f"<= {target} ({met})")
        lines.append("| " + " | ".join(line) + " |")
    lines += ["", "| case | " + " | ".join(f"server CPU ms/call, {names[v]}" for v in variants) + " | "
              + " | ".join(f"client CPU ms/call, {names[v]}" for v in variants) + " |",
              "|---|" + "---:|" * (2 * len(variants))]
    for case, label, _, _ in ROWS[1:]:
        line = [label.split(":")[0]]
        for key in ("server_cpu_s", "client_cpu_s"):
            for variant in variants:
                # every call of the case: the measured ones and the one before them
                per_call = [1000 * x[key] / (len(x["times"]) + 1) for x in results[case][variant]]
                line.append(_median_spread(per_call))
        lines.append("| " + " | ".join(line) + " |")
    if "mixed8" in results:
        lines += ["", "| mixed, req/s | 8 clients | 32 clients | 64 clients | 32 / 8 | 64 / 8 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for variant in variants:
            rps = {c: [x["rps"] for x in results[f"mixed{c}"][variant]] for c in (8, 32, 64)}
            lines.append(f"| {names[variant]} | {statistics.median(rps[8]):.1f} | {statistics.median(rps[32]):.1f} | "
                         f"{statistics.median(rps[64]):.1f} | {_median_spread(_mixed_ratios(results, variant, 32))} | "
                         f"{_median_spread(_mixed_ratios(results, variant, 64))} |")
    lines += ["", "One 75 MB copy in this process (median ms): "
              + ", ".join(f"{k} {v:.1f}" for k, v in figures["copies_ms"].items())]
    return lines


if __name__ == "__main__":
    sys.exit(main())
