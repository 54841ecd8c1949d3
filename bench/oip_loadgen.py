"""Closed-loop load over the Open Inference Protocol with Triton's own Python
clients, `tritonclient.grpc` or `tritonclient.http`: N worker threads, each with
its own client object (neither client is thread-safe), each sending its next
request when the previous answer arrived and reading every output with
`as_numpy`. Text in (`text`, [1, 1] BYTES), or with `--inputs ids` the token
ids of the same texts (`input_ids` and `attention_mask`, [1, seq] INT64, as any
BERT model served over the protocol takes them: the peers of bench.peers), the
workload's tensors out; over HTTP the outputs come as Triton binary data, or as
JSON numbers with `--json-outputs`. Prints one JSON line, with the fields of
bench.loadgen's.

Both protocols are driven the same way (threads, one client each) so that the
difference measured is the protocol and its client, not the harness."""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bench.workloads import WORKLOADS, Workload

PROTOCOLS = ("grpc", "http")
INPUTS = ("text", "ids")
MODEL = "minilm-l6"


def oip_outputs(wl: Workload) -> list[str]:
    """The OIP outputs that carry what the workload asks of attention.v1."""
    out = []
    if wl.options.get("hidden_states", True):
        out.append("last_hidden_state")
    if wl.options.get("attention", True):
        out.append("attentions")
    if "top_k" in wl.options:
        out += ["tokens", "pair_from_index", "pair_to_index", "pair_strength"]
    return out


def oip_parameters(wl: Workload) -> dict[str, Any]:
    return {k: v for k, v in wl.options.items() if k in ("top_k", "min_strength", "exclude_special_tokens")}


class Caller:
    """One worker's client and its prepared requests."""

    def __init__(self, protocol: str, url: str, wl: Workload, texts: list[str], json_outputs: bool,
                 ids: list[list[int]] | None = None, model: str = MODEL) -> None:
        """`ids`, when given, are sent instead of the texts (input_ids, attention_mask)."""
        if protocol == "grpc":
            import tritonclient.grpc as client_module
        else:
            import tritonclient.http as client_module  # type: ignore[no-redef]
        self.module = client_module
        kwargs: dict[str, Any] = {} if protocol == "grpc" else {"network_timeout": 120.0}
        self.client = client_module.InferenceServerClient(url, **kwargs)
        self.protocol = protocol
        self.model = model
        self.names = oip_outputs(wl)
        self.parameters = oip_parameters(wl) or None
        self.requests = []
        if ids is not None:
            for seq in ids:
                tensors = []
                for name in ("input_ids", "attention_mask"):
                    item = client_module.InferInput(name, [1, len(seq)], "INT64")
                    item.set_data_from_numpy(np.array([seq if name == "input_ids" else [1] * len(seq)], np.int64))
                    tensors.append(item)
                self.requests.append(tensors)
        else:
            for text in texts:
                item = client_module.InferInput("text", [1, 1], "BYTES")
                item.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
                self.requests.append([item])
        if protocol == "grpc":
            self.outputs = [client_module.InferRequestedOutput(n) for n in self.names]
        else:
            self.outputs = [client_module.InferRequestedOutput(n, binary_data=not json_outputs) for n in self.names]

    def call(self, i: int) -> tuple[int, int]:
        """One request; (tokens, payload bytes) of its answer."""
        deadline = {"client_timeout": 120.0} if self.protocol == "grpc" else {}  # http: network_timeout
        result = self.client.infer(self.model, self.requests[i % len(self.requests)], outputs=self.outputs,
                                   parameters=self.parameters, **deadline)
        arrays = [result.as_numpy(n) for n in self.names]
        tokens = next((a.shape[1] for a in arrays if a.ndim >= 2), 0)
        return tokens, sum(a.nbytes for a in arrays)

    def close(self) -> None:
        self.client.close()


def run(protocol: str, url: str, workload: str, concurrency: int, duration: float, warmup: float,
        json_outputs: bool = False, inputs: str = "text", model: str = MODEL) -> dict[str, Any]:
    wl = WORKLOADS[workload]
    texts = wl.texts(512, seed=concurrency)
    ids = None
    if inputs == "ids":
        from bench.baselines import tokenize

        ids = tokenize(texts)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    totals = [[0, 0, 0] for _ in range(concurrency)]  # calls (warm-up included), tokens, payload bytes (measured)
    clock: dict[str, Any] = {}

    def set_clock() -> None:  # once every worker is connected
        clock["warmup_until"] = time.perf_counter() + warmup
        clock["stop_at"] = clock["warmup_until"] + duration
        clock["cpu"] = resource.getrusage(resource.RUSAGE_SELF)

    start = threading.Barrier(concurrency, action=set_clock)

    def worker(k: int) -> None:
        mine, total = latencies[k], totals[k]
        caller = None
        try:
            # Made in the thread that uses it: tritonclient.http's gevent hub is per thread.
            caller = Caller(protocol, url, wl, texts[k::concurrency], json_outputs,
                            None if ids is None else ids[k::concurrency], model)
            caller.call(0)  # connect
            start.wait()
            i = 1
            while time.perf_counter() < clock["stop_at"] or not mine:  # at least one measured call
                started = time.perf_counter()
                tokens, payload = caller.call(i)
                done = time.perf_counter()
                i += 1
                total[0] += 1
                if started >= clock["warmup_until"]:
                    mine.append(done - started)
                    total[1] += tokens
                    total[2] += payload
        except BaseException:
            start.abort()  # the others stop waiting for this one
            raise
        finally:
            if caller is not None:
                caller.close()

    with ThreadPoolExecutor(concurrency) as pool:
        workers = [pool.submit(worker, k) for k in range(concurrency)]
    errors = [e for e in (f.exception() for f in workers) if e is not None]
    if errors:  # a worker's own error, rather than the BrokenBarrierError it caused the others
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = time.perf_counter() - clock["warmup_until"]
    cpu0 = clock["cpu"]
    lat = np.array([x for mine in latencies for x in mine]) * 1000
    calls = sum(t[0] for t in totals)
    client_cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return {
        "workload": workload, "protocol": protocol, "outputs": "json" if json_outputs else "binary", "inputs": inputs,
        "concurrency": concurrency, "requests": len(lat), "calls": calls + concurrency,
        "seconds": elapsed, "rps": len(lat) / elapsed, "tokens_per_s": sum(t[1] for t in totals) / elapsed,
        "mb_per_s": sum(t[2] for t in totals) / elapsed / 1e6,
        "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        # CPU of this process per call, warm-up included (the window covers it).
        "client_cpu_ms_per_call": client_cpu * 1000 / calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--protocol", choices=PROTOCOLS, required=True)
    parser.add_argument("--url", required=True, help="host:port of the gRPC or the HTTP port (no scheme)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--json-outputs", action="store_true", help="HTTP: outputs as JSON numbers, not binary")
    parser.add_argument("--inputs", choices=INPUTS, default="text",
                        help="the texts, or their token ids (input_ids, attention_mask)")
    parser.add_argument("--model", default=MODEL)
    args = parser.parse_args()
    if args.json_outputs and args.protocol != "http":
        parser.error("--json-outputs is for --protocol http")
    print(json.dumps(run(args.protocol, args.url, args.workload, args.concurrency, args.duration, args.warmup,
                         args.json_outputs, args.inputs, args.model)))


if __name__ == "__main__":
    main()
