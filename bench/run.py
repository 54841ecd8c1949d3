"""`make bench`: the service against in-process ONNX Runtime and HF transformers,
measured side by side in one run on the real model. Prints a markdown table
with the ratios, writes bench/results/latest.json and latest.png."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from attention_client import tune_malloc
from bench.baselines import HfBaseline, OrtBaseline, tokenize
from bench.ort_rss import rss_kib
from bench.workloads import HEAVY, MIXED, ROOT, SHORT, Workload, text_of_length

RESULTS = ROOT / "bench" / "results"


class Server:
    """The real `attention-server` in its own process, on a free port."""

    def __init__(self, *args: str) -> None:
        self.args = args

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "attention_server", "--host", "127.0.0.1", "--port", "0", "--log-level",
             "WARNING", "--metrics-port", "-1", "--http-port", "-1", *self.args],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = re.search(r":(\d+)$", line.strip())
        if not match:
            raise RuntimeError(f"server did not start: {line!r}")
        self.target = f"127.0.0.1:{match.group(1)}"
        return self

    def rss(self) -> dict[str, int]:
        return rss_kib(str(self.proc.pid))

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(30)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per service measurement")
    parser.add_argument("--baseline-seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32, 64])
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sequence length / batch size sweeps")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for latest.json/.md/.png")
    args = parser.parse_args()
    tune_malloc()  # this process is the client of the length sweep (see attention_client.memory)
    started = time.perf_counter()
    out: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "service": {},
                           "ort": {}, "hf": {}, "rss_kib": {}, "sweep": {}}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    ort = OrtBaseline()
    hf = None if args.no_hf else HfBaseline()
    secs = args.baseline_seconds
    ids = {w.name: tokenize(w.texts(256)) for w in (SHORT, HEAVY, MIXED)}

    with Server() as server:
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

        if not args.no_sweep:
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

    log("RSS reference: a fresh process with one ORT session running the heavy batches")
    ref = subprocess.run([sys.executable, "-m", "bench.ort_rss", "1", "8", "32"], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    out["rss_kib"]["ort_in_process"] = json.loads(ref.stdout)
    out["ratios"] = ratios(out)
    out["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(out, indent=2) + "\n")
    report = markdown(out)
    (args.out / "latest.md").write_text(report + "\n")
    print(report)
    try:
        from bench.plot import plot

        plot(out, args.out / "latest.png")
        log(f"wrote {args.out / 'latest.png'}")
    except ImportError as exc:
        log(f"no plot ({exc}); install requirements/bench.txt")
    log(f"done in {out['seconds']:.0f} s")
    return 0


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
    lines = [f"Measured {out['date']} on {out['machine']}.", "",
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
    rss = out["rss_kib"]
    lines += ["", "| RSS | MiB (peak MiB) |", "|---|---:|"]
    for key, r in rss.items():
        lines.append(f"| {key} | {r['VmRSS'] / 1024:.0f} ({r['VmHWM'] / 1024:.0f}) |")
    if out.get("sweep"):
        lines += ["", "| tokens | ORT batch-1 ms | service ms (full attention, 1 client) | service / ORT |",
                  "|---:|---:|---:|---:|"]
        for n, r in out["sweep"]["length"].items():
            lines.append(f"| {n} | {r['ort_ms']:.1f} | {r['service_ms']:.1f} | {r['service_ms'] / r['ort_ms']:.2f} |")
        lines += ["", "| tokens x batch | ORT ms | ORT tokens/s |", "|---|---:|---:|"]
        for k, r in out["sweep"]["batch"].items():
            lines.append(f"| {k} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} |")
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---|---|"]
    for r in out["ratios"]:
        lines.append(f"| {r['ratio']} | {r['value']:.2f} | {r['target']} | {'yes' if r['met'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
