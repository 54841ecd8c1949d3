"""Memory after heavy work, against speed: the same server under allocator and
ONNX Runtime arena settings, side by side in one run.

Each configuration is a real server process; rounds are interleaved (every
round runs every configuration once, in a rotating order) so that the shared
machine's noise falls on all of them alike. A round: 8 concurrent callers send
48 x 128-token texts with full float32 attention (throughput), then 2 calls of
a 510-token text (latency). Afterwards each server's RSS is read at once and
again once it has settled, next to its peak (VmHWM) and its idle RSS.

    python -m bench.memory [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from attention_client import AttentionClient
from bench.hostile import Server

HEAVY_TEXT = "the quick brown fox jumps over the lazy dog while heads attend " * 11  # ~128 tokens
LONG_TEXT = "word " * 510


@dataclass
class Config:
    name: str
    flags: tuple[str, ...]
    throughput: list[float] = field(default_factory=list)  # sequences/s per round
    long_ms: list[float] = field(default_factory=list)
    server: Server | None = None
    idle_mib: float = 0.0


CONFIGS = [
    Config("malloc tuned, ORT arena kept", ("--tune-malloc", "--ort-memory-arena", "keep")),
    Config("malloc tuned, ORT arena shrunk", ("--tune-malloc", "--ort-memory-arena", "shrink")),
    Config("malloc tuned, ORT arena off", ("--tune-malloc", "--ort-memory-arena", "off")),
    Config("glibc defaults, arena kept", ("--no-tune-malloc", "--ort-memory-arena", "keep")),
    Config("glibc defaults, arena shrunk", ("--no-tune-malloc", "--ort-memory-arena", "shrink")),
]


def _heavy_burst(target: str, calls: int = 48, callers: int = 8) -> float:
    """Sequences per second for `calls` unary calls from `callers` threads."""
    done = 0
    lock = threading.Lock()
    with AttentionClient(target, timeout=300) as client:
        client.analyze(HEAVY_TEXT, hidden_states=False)

        def caller() -> None:
            nonlocal done
            while True:
                with lock:
                    if done >= calls:
                        return
                    done += 1
                client.analyze(HEAVY_TEXT, hidden_states=False)

        started = time.perf_counter()
        threads = [threading.Thread(target=caller) for _ in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return calls / (time.perf_counter() - started)


def _long_calls(target: str, calls: int = 2) -> float:
    with AttentionClient(target, timeout=300) as client:
        started = time.perf_counter()
        for _ in range(calls):
            client.analyze(LONG_TEXT, hidden_states=False)
        return (time.perf_counter() - started) / calls * 1000


def _settled_rss(server: Server, timeout: float = 30.0, quiet: float = 2.0) -> float:
    """RSS once it has not changed by more than 1 MiB for `quiet` seconds."""
    end = time.monotonic() + timeout
    value, since = server.rss_mib(), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.25)
        now = server.rss_mib()
        if abs(now - value) > 1:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    configs = [Config(c.name, c.flags) for c in CONFIGS]
    with ExitStack() as stack:
        for c in configs:
            c.server = Server(*c.flags)
            stack.callback(c.server.close)
        for c in configs:
            assert c.server is not None
            with AttentionClient(c.server.target, timeout=60) as client:
                client.analyze("warm up")
            c.idle_mib = _settled_rss(c.server)
        for r in range(args.rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for c in order:
                assert c.server is not None
                c.throughput.append(_heavy_burst(c.server.target))
                c.long_ms.append(_long_calls(c.server.target))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        rows = []
        reference = statistics.median(configs[0].throughput)
        for c in configs:
            assert c.server is not None
            after = c.server.rss_mib()
            settled = _settled_rss(c.server)
            rows.append({
                "config": c.name, "flags": list(c.flags),
                "seq_per_s": statistics.median(c.throughput),
                "seq_per_s_ratio": statistics.median(c.throughput) / reference,
                "long_ms": statistics.median(c.long_ms),
                "idle_mib": c.idle_mib, "peak_mib": c.server.peak_mib(), "after_mib": after,
                "settled_mib": settled,
            })
    print(f"{'configuration':32} {'seq/s':>7} {'ratio':>6} {'510-tok ms':>10} {'idle':>6} {'peak':>6} "
          f"{'after':>6} {'settled':>7}  (MiB)")
    for row in rows:
        print(f"{row['config']:32} {row['seq_per_s']:7.1f} {row['seq_per_s_ratio']:6.2f} {row['long_ms']:10.0f} "
              f"{row['idle_mib']:6.0f} {row['peak_mib']:6.0f} {row['after_mib']:6.0f} {row['settled_mib']:7.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
