"""Shared memory against the wire, side by side (issue 13, part 3): the heavy
workload (8 callers x one 128-token sequence, full float32 attention and hidden
states) through Triton's system shared-memory extension, through the Open
Inference Protocol over gRPC with binary tensors, and in-process ONNX Runtime
on batches of 8 (the limit), in interleaved rounds; medians.

    .venv-dev/bin/python -m bench.shm            # 5 rounds of 5 s each
    .venv-dev/bin/python -m bench.shm --quick    # 3 rounds of 2 s

Both service paths send the same token ids (`input_ids`, `attention_mask`, [1, 128]
INT64) with tritonclient.grpc, one client a thread, each thread sending its next
request when the previous answer arrived. Through shared memory each caller has
its own input region (the ids, written once per call with
`set_shared_memory_region`, as a caller with new inputs would) and its own output
region, which the server writes and the caller reads with `get_contents_as_numpy`
(a view, as `as_numpy` is over gRPC). Client CPU is this process's CPU over the
measured window (gRPC's own threads included), per sequence. One more row: a
single caller sending the 8 sequences in one request through shared memory, as
a batch job would (the issue's target is on the 8 callers). Prints one JSON
document and a table."""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bench import oip_loadgen
from bench.baselines import OrtBaseline, tokenize
from bench.server import Server
from bench.workloads import WORKLOADS

MODEL = "minilm-l6"
CALLERS = 8
OUTPUTS = ("last_hidden_state", "attentions")
TARGET_RATIO = 0.95  # of in-process ORT batch 8
TARGET_CPU_MS = 0.3  # client CPU per sequence


class ShmCaller:
    """One thread's tritonclient.grpc client with its own regions, registered once."""

    def __init__(self, url: str, ids: list[list[int]], tag: str, batch: int = 1) -> None:
        """`batch` sequences a request (all of `ids` have one length)."""
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm

        self.shm = shm
        self.client = grpcclient.InferenceServerClient(url)
        self.ids = [np.array(ids[i:i + batch], dtype=np.int64) for i in range(0, len(ids) - batch + 1, batch)]
        n = len(ids[0])
        self.in_bytes = 2 * 8 * n * batch
        self.sizes = {"last_hidden_state": batch * n * 384 * 4, "attentions": batch * 6 * 12 * n * n * 4}
        self.names = (f"in_{tag}", f"out_{tag}")
        self.regions = []
        for name, size in zip(self.names, (self.in_bytes, sum(self.sizes.values())), strict=True):
            key = f"/bench_{name}_{os.getpid()}"
            self.regions.append(shm.create_shared_memory_region(name, key, size))
            self.client.register_system_shared_memory(name, key, size)
        shape = [batch, n]
        self.inputs = [grpcclient.InferInput(name, shape, "INT64") for name in ("input_ids", "attention_mask")]
        self.inputs[0].set_shared_memory(self.names[0], 8 * n * batch)
        self.inputs[1].set_shared_memory(self.names[0], 8 * n * batch, offset=8 * n * batch)
        self.outputs = []
        offset = 0
        self.offsets = {}
        for name in OUTPUTS:
            out = grpcclient.InferRequestedOutput(name)
            out.set_shared_memory(self.names[1], self.sizes[name], offset=offset)
            self.offsets[name] = offset
            offset += self.sizes[name]
            self.outputs.append(out)
        self.mask = np.ones(shape, dtype=np.int64)

    def call(self, i: int) -> int:
        """One request; the payload bytes the caller can read."""
        ids = self.ids[i % len(self.ids)]
        self.shm.set_shared_memory_region(self.regions[0], [ids, self.mask])
        result = self.client.infer(MODEL, self.inputs, outputs=self.outputs, client_timeout=120.0)
        total = 0
        for name in OUTPUTS:
            meta = result.get_output(name)
            array = self.shm.get_contents_as_numpy(self.regions[1], np.float32, list(meta.shape),
                                                   offset=self.offsets[name])
            total += array.nbytes
        return total

    def close(self) -> None:
        for name in self.names:
            self.client.unregister_system_shared_memory(name)
        for region in self.regions:
            self.shm.destroy_shared_memory_region(region)
        self.client.close()


def run_shm(url: str, ids: list[list[int]], duration: float, warmup: float, callers: int = CALLERS,
            batch: int = 1) -> dict[str, Any]:
    """Closed loop, `callers` threads of `batch` sequences a request, as bench.oip_loadgen.run does
    for the wire; rates and client CPU per sequence."""
    latencies: list[list[float]] = [[] for _ in range(callers)]
    calls = [0] * callers
    clock: dict[str, Any] = {}

    def set_clock() -> None:
        clock["warmup_until"] = time.perf_counter() + warmup
        clock["stop_at"] = clock["warmup_until"] + duration
        clock["cpu"] = resource.getrusage(resource.RUSAGE_SELF)

    start = threading.Barrier(callers, action=set_clock)

    def worker(k: int) -> None:
        caller = None
        try:
            caller = ShmCaller(url, ids[k::callers], f"{k}_{uuid.uuid4().hex[:6]}", batch)
            caller.call(0)
            start.wait()
            i = 1
            while time.perf_counter() < clock["stop_at"] or not latencies[k]:
                started = time.perf_counter()
                caller.call(i)
                done = time.perf_counter()
                i += 1
                calls[k] += 1
                if started >= clock["warmup_until"]:
                    latencies[k].append(done - started)
        except BaseException:
            start.abort()
            raise
        finally:
            if caller is not None:
                caller.close()

    with ThreadPoolExecutor(callers) as pool:
        workers = [pool.submit(worker, k) for k in range(callers)]
    for f in workers:
        f.result()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = clock["cpu"]
    elapsed = time.perf_counter() - clock["warmup_until"]
    lat = np.array([x for mine in latencies for x in mine]) * 1000
    client_cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return {"rps": len(lat) * batch / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "client_cpu_ms_per_call": client_cpu * 1000 / ((sum(calls) + callers) * batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds of each path in each round")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 s")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 3, 2.0
    report = measure(args.rounds, args.seconds, args.warmup)
    print(json.dumps(report, indent=1))
    print("\n".join(table(report)))


def measure(rounds: int, seconds: float, warmup: float) -> dict[str, Any]:
    """The four paths in interleaved rounds, their medians and the targets."""
    wl = WORKLOADS["heavy"]
    ids = tokenize(wl.texts(256, seed=CALLERS))
    ort = OrtBaseline()
    batches = [ids[i:i + CALLERS] for i in range(0, len(ids), CALLERS)]
    results: dict[str, list[dict[str, Any]]] = {"ort_b8": [], "grpc_binary": [], "shm": [], "shm_b8": []}
    load = [os.getloadavg()]
    with Server("--shared-memory") as server:
        for r in range(rounds):
            paths = list(results)
            for path in paths[r % len(paths):] + paths[:r % len(paths)]:  # interleaved: each goes first in turn
                if path == "ort_b8":
                    o = ort.run(batches, list(OUTPUTS), seconds)
                    results[path].append({"rps": o["sequences_per_s"], "p50_ms": o["p50_ms"]})
                elif path == "grpc_binary":
                    g = oip_loadgen.run("grpc", server.target, "heavy", CALLERS, seconds, warmup,
                                        inputs="ids")
                    results[path].append({"rps": g["rps"], "p50_ms": g["p50_ms"],
                                          "client_cpu_ms_per_call": g["client_cpu_ms_per_call"]})
                elif path == "shm":
                    results[path].append(run_shm(server.target, ids, seconds, warmup))
                else:  # one caller, the 8 sequences in one request: a batch job's way
                    results[path].append(run_shm(server.target, ids, seconds, warmup, 1, CALLERS))
            load.append(os.getloadavg())
    medians = {path: {key: float(np.median([x[key] for x in runs])) for key in runs[0]}
               for path, runs in results.items()}
    ratio = medians["shm"]["rps"] / medians["ort_b8"]["rps"]
    cpu = medians["shm"]["client_cpu_ms_per_call"]
    return {"rounds": rounds, "seconds": seconds, "loadavg_1m": [round(x[0], 2) for x in load],
            "cores": os.cpu_count(), "runs": results, "medians": medians,
            "targets": {"shm / in-process ORT batch 8": {"measured": ratio, "target": f">= {TARGET_RATIO}",
                                                         "met": ratio >= TARGET_RATIO},
                        "shm client CPU ms per sequence": {"measured": cpu, "target": f"< {TARGET_CPU_MS}",
                                                           "met": cpu < TARGET_CPU_MS}}}


def table(report: dict[str, Any]) -> list[str]:
    medians = report["medians"]
    lines = [f"heavy: {CALLERS} callers x 1 x 128 tokens, full float32 attention + hidden states; "
             f"{report['rounds']} interleaved rounds of {report['seconds']:g} s; medians; load average (1 min) "
             f"{min(report['loadavg_1m'])}-{max(report['loadavg_1m'])} on {report['cores']} cores", "",
             "| path | seq/s | p50 ms | client CPU ms/seq | x ORT b8 |", "|---|---:|---:|---:|---:|"]
    labels = {"ort_b8": "in-process ORT, batch 8", "grpc_binary": "OIP gRPC, binary tensors",
              "shm": "OIP gRPC, system shared memory",
              "shm_b8": "the same, 1 caller x batch 8"}
    for path, m in medians.items():
        cpu_text = f"{m['client_cpu_ms_per_call']:.3f}" if "client_cpu_ms_per_call" in m else "-"
        lines.append(f"| {labels[path]} | {m['rps']:.1f} | {m['p50_ms']:.1f} | {cpu_text} | "
                     f"{m['rps'] / medians['ort_b8']['rps']:.2f} |")
    lines.append("")
    for name, t in report["targets"].items():
        lines.append(f"target {name}: {t['measured']:.3f} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    return lines


if __name__ == "__main__":
    main()
