"""Closed-loop load through the client SDK: N concurrent callers, each sending its
next request when the previous answer arrived. Prints one JSON line."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np

from attention_client import AsyncAttentionClient, tune_malloc
from bench.workloads import WORKLOADS


def _payload_bytes(result) -> int:  # type: ignore[no-untyped-def]
    size = sum(a.nbytes for a in (result.attention, result.hidden_states) if a is not None)
    return size + 24 * len(result.tokens) + sum(12 * len(hp.pairs) + 8 for hp in result.pairs)


async def run(target: str, workload: str, concurrency: int, duration: float, warmup: float) -> dict:
    wl = WORKLOADS[workload]
    texts = wl.texts(512, seed=concurrency)
    latencies: list[float] = []
    tokens = payload = calls = 0
    stop_at = warmup_until = 0.0

    async with AsyncAttentionClient(target, timeout=120) as client:
        async def caller(k: int) -> None:
            nonlocal tokens, payload, calls
            i = k
            while time.perf_counter() < stop_at or not latencies:  # at least one measured call
                started = time.perf_counter()
                result = await client.analyze(texts[i % len(texts)], **wl.options)
                done = time.perf_counter()
                i += concurrency
                calls += 1
                if started >= warmup_until:
                    latencies.append(done - started)
                    tokens += len(result.tokens)
                    payload += _payload_bytes(result)

        await client.analyze(texts[0], **wl.options)  # connect
        warmup_until = time.perf_counter() + warmup
        stop_at = warmup_until + duration
        await asyncio.gather(*(caller(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - warmup_until
    lat = np.array(latencies) * 1000
    return {
        "workload": workload, "concurrency": concurrency, "requests": len(latencies),
        "calls": calls + 1,  # every call this run made (warm-up and the connecting one included)
        "seconds": elapsed, "rps": len(latencies) / elapsed, "tokens_per_s": tokens / elapsed,
        "mb_per_s": payload / elapsed / 1e6,
        "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator settings alone")
    args = parser.parse_args()
    if not args.default_malloc:
        tune_malloc()
    print(json.dumps(asyncio.run(run(args.target, args.workload, args.concurrency, args.duration, args.warmup))))


if __name__ == "__main__":
    main()
