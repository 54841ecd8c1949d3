"""The section `peers` of `make bench`: this service, KServe, MLServer and MLServer
with adaptive batching, all started side by side and left running, each driven in
turn by bench.oip_loadgen (tritonclient.grpc, token ids in, FP32 tensors out) for
three workloads, and in-process ONNX Runtime on the same ids; in interleaved rounds
(bench.compare's), the order within each workload rotating from round to round."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench import compare
from bench.baselines import OrtBaseline, tokenize
from bench.peers import report, servers
from bench.peers.session import OUTPUTS
from bench.server import Server
from bench.workloads import ROOT, WORKLOADS

Variant = Callable[[float], dict[str, Any]]


def pinned(package: str) -> str:
    """The version of a peer's package in its lock (requirements/bench-<package>.txt)."""
    lock = ROOT / "requirements" / f"bench-{package}.txt"
    return next(line.split("==", 1)[1].split()[0] for line in lock.read_text().splitlines()
                if line.startswith(f"{package}=="))


def adaptive_settings() -> str:
    """What MLServer's adaptive batching is set to, as the report says it."""
    path = servers.MLSERVER_CONFIGS / "adaptive" / "minilm-l6" / "model-settings.json"
    settings = json.loads(path.read_text())
    return f"max_batch_size {settings['max_batch_size']}, max_batch_time {settings['max_batch_time'] * 1000:g} ms"


def loadgen(server: compare.Measured, target: str, workload: str, concurrency: int, seconds: float,
            fraction: float) -> dict[str, Any]:
    length = seconds * fraction
    return compare.measure(server, ["bench.oip_loadgen", "--protocol", "grpc", "--inputs", "ids", "--url", target,
                                    "--workload", workload, "--concurrency", str(concurrency), "--duration",
                                    f"{length:.2f}", "--warmup", f"{min(1.0, length / 3):.2f}"])


def in_process(ort: OrtBaseline, batches: list[list[list[int]]], seconds: float, fraction: float) -> dict[str, Any]:
    result = ort.run(batches, list(OUTPUTS), seconds * fraction)
    return {**result, "rps": result["sequences_per_s"]}


def measure(rounds: int, seconds: float, log: compare.Log) -> dict[str, Any]:
    started = compare.loadavg()
    versions = {name: pinned(name) for name in ("kserve", "mlserver")}
    versions["mlserver_adaptive"] = versions["mlserver"]
    ort = OrtBaseline()
    # The texts bench.oip_loadgen sends with as many callers (its seed), so the same ids.
    heavy = tokenize(WORKLOADS["heavy"].texts(64, seed=8))
    small = tokenize(WORKLOADS["small"].texts(64, seed=1))
    with tempfile.TemporaryDirectory() as workdir, contextlib.ExitStack() as stack:
        log("peers: starting this service, KServe, MLServer and MLServer with adaptive batching")
        peers = {"kserve": servers.kserve(), "mlserver": servers.mlserver("plain", Path(workdir)),
                 "mlserver_adaptive": servers.mlserver("adaptive", Path(workdir))}
        for peer in peers.values():  # all starting at once; each waited for below
            peer.start()
            stack.callback(peer.__exit__)
        ours = stack.enter_context(Server())
        for peer in peers.values():
            peer.wait()
        targets: dict[str, tuple[compare.Measured, str]] = {
            "service": (ours, ours.target), **{name: (peer, peer.target) for name, peer in peers.items()}}
        variants: dict[str, Variant] = {}
        for case, (workload, concurrency) in report.CASES.items():
            for name, (server, target) in targets.items():
                variants[f"{case}_{name}"] = partial(loadgen, server, target, workload, concurrency, seconds)
        variants["heavy_ort_b8"] = partial(in_process, ort, [heavy[i:i + 8] for i in range(0, 64, 8)], seconds)
        variants["small_ort_b1"] = partial(in_process, ort, [[s] for s in small], seconds)
        groups = [[f"{case}_{name}" for name in targets] for case in report.CASES]
        groups[0].append("heavy_ort_b8")
        groups[1].append("small_ort_b1")
        # No warm-up round: each load-generator run warms up on its own (a first call per caller, then
        # a third of its time, at most 1 s, before it measures), the slowest peers' runs already last
        # two of their calls or more, and the whole of `make bench` has 10 minutes.
        runs, loads = compare._rounds(variants, groups, rounds, log, warm_up=False)
    return {"rounds": rounds, "seconds_per_run": seconds, "versions": versions, "adaptive": adaptive_settings(),
            "loadavg": [started, *loads, compare.loadavg()], "runs": runs, "summary": report.summary(runs),
            "targets": report.targets(runs)}
