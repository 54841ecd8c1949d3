"""Hostile and unlucky callers against a real server process, measured: time to
answer, the server's peak RSS growth (VmHWM, reset before each case), its RSS
afterwards, and how long health probes stalled meanwhile (the event loop).

    python -m bench.hostile                    # this tree's server
    python -m bench.hostile --server-src DIR   # another checkout's server/ (e.g. a git worktree of an
                                               # older commit), for before/after figures side by side

The tests (tests/integration/test_hostile.py) run the same cases and assert
their bounds; this prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_server._proto.inference import grpc_service_pb2 as kpb

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "models" / "repository"
MiB = 1 << 20
ANALYZE = "/attention.v1.AttentionService/Analyze"
ANALYZE_STREAM = "/attention.v1.AttentionService/AnalyzeStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", 64 * MiB),
                   ("grpc.max_metadata_size", 16 * MiB)]
# A caller that stops reading: without BDP probing its transport's window stays at the initial
# 64 KiB, so what the server sends is not taken into the client's buffers behind its back.
NOT_READING = [*CHANNEL_OPTIONS, ("grpc.http2.bdp_probe", 0)]


# -- the server process -------------------------------------------------------------------

def _status_kib(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


class Server:
    """`python -m attention_server` on a free port; `server_src` runs another tree's server code."""

    def __init__(self, *args: str, server_src: Path | None = None) -> None:
        env = dict(os.environ)
        if server_src is not None:
            env["PYTHONPATH"] = f"{server_src}{os.pathsep}{env.get('PYTHONPATH', '')}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "attention_server", "--host", "127.0.0.1", "--port", "0",
             "--model-repository", str(REPOSITORY), "--metrics-port", "-1", "--http-port", "-1", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on .*:(\d+)$", line.strip())
        if not match:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.target = f"127.0.0.1:{match.group(1)}"
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mib(self) -> float:
        return _status_kib(self.pid, "VmRSS") / 1024

    def peak_mib(self) -> float:
        return _status_kib(self.pid, "VmHWM") / 1024

    def reset_peak(self) -> None:
        """VmHWM := current RSS (Linux clear_refs 5)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def log_bytes(self) -> int:
        return sum(len(line) for line in self.log)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# -- probes -----------------------------------------------------------------------------

class HealthProbe:
    """grpc.health.v1 Check every `every` seconds on its own channel; the longest answer wins."""

    def __init__(self, target: str, every: float = 0.05, timeout: float = 3.0) -> None:
        self.target, self.every, self.timeout = target, every, timeout
        self.worst = 0.0
        self.failed = 0
        self.probes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout)
                except grpc.RpcError:
                    self.failed += 1
                self.worst = max(self.worst, time.perf_counter() - started)
                self.probes += 1
                self._stop.wait(self.every)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Outcome:
    case: str
    code: str
    seconds: float
    peak_growth_mib: float
    rss_after_mib: float
    health_worst_ms: float
    health_failed: int
    details: str = ""
    extra: dict[str, float] = field(default_factory=dict)


def _code(exc: grpc.RpcError) -> str:
    return exc.code().name  # type: ignore[attr-defined, no-any-return]


def measure(server: Server, case: str, call: Callable[[grpc.Channel], tuple[str, str]]) -> Outcome:
    """Run `call` once on a fresh channel with health probes alongside."""
    server.reset_peak()
    base = server.rss_mib()
    with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel, \
            HealthProbe(server.target) as probe:
        started = time.perf_counter()
        try:
            code, details = call(channel)
        except grpc.RpcError as exc:
            code, details = _code(exc), exc.details() or ""  # type: ignore[attr-defined]
        seconds = time.perf_counter() - started
    return Outcome(case, code, seconds, server.peak_mib() - base, server.rss_mib(), probe.worst * 1000,
                   probe.failed, details[:200])


# -- the cases --------------------------------------------------------------------------

def oip_top_k(k: int, outputs: tuple[str, ...] = ("pair_strength",)) -> Callable[[grpc.Channel], tuple[str, str]]:
    """A ~120-byte ModelInfer: one short text, pair outputs, a huge top_k."""
    def call(channel: grpc.Channel) -> tuple[str, str]:
        request = kpb.ModelInferRequest(
            model_name="minilm-l6",
            inputs=[kpb.ModelInferRequest.InferInputTensor(
                name="text", datatype="BYTES", shape=[1],
                contents=kpb.InferTensorContents(bytes_contents=[b"a short hostile text"]))],
            outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs])
        request.parameters["top_k"].int64_param = k
        raw = channel.unary_unary(MODEL_INFER)(request.SerializeToString(), timeout=120)
        return "OK", f"{len(raw)} bytes"
    return call


def many_ids(count: int = 8_300_000, token: int = 1000) -> Callable[[grpc.Channel], tuple[str, str]]:
    """attention.v1 Analyze with one sequence of `count` ids (2 bytes each on the wire: ~16 MiB)."""
    request = pb.AnalyzeRequest(sequences=[pb.Sequence(token_ids=pb.TokenIds(ids=[token] * count))]).SerializeToString()

    def call(channel: grpc.Channel) -> tuple[str, str]:
        channel.unary_unary(ANALYZE)(request, timeout=120)
        return "OK", ""
    return call


def long_text(chars: int = 16 * MiB - 64) -> Callable[[grpc.Channel], tuple[str, str]]:
    """attention.v1 Analyze with one ~16 MiB text."""
    text = ("word " * (chars // 5 + 1))[:chars]
    request = pb.AnalyzeRequest(sequences=[pb.Sequence(text=text)]).SerializeToString()

    def call(channel: grpc.Channel) -> tuple[str, str]:
        channel.unary_unary(ANALYZE)(request, timeout=120)
        return "OK", ""
    return call


def concurrently(calls: list[Callable[[grpc.Channel], tuple[str, str]]]) -> Callable[[grpc.Channel], tuple[str, str]]:
    """Several calls at once, each on its own channel; the worst code wins."""
    def call(channel: grpc.Channel) -> tuple[str, str]:
        results: list[tuple[str, str]] = []
        target = channel._channel.target().decode()  # type: ignore[attr-defined]

        def one(fn: Callable[[grpc.Channel], tuple[str, str]]) -> None:
            with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as own:
                try:
                    results.append(fn(own))
                except grpc.RpcError as exc:
                    results.append((_code(exc), exc.details() or ""))  # type: ignore[attr-defined]

        threads = [threading.Thread(target=one, args=(fn,)) for fn in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        codes = sorted({c for c, _ in results})
        return ",".join(codes), results[0][1] if results else ""
    return call


def unread_stream(server: Server, sequences: int = 64, words: int = 510, hold: float = 8.0) -> Outcome:
    """AnalyzeStream of `sequences` x (words + 2) tokens, full float32 attention:
    read one result, then stop reading for `hold` seconds; RSS growth meanwhile."""
    request = pb.AnalyzeRequest(sequences=[pb.Sequence(text="word " * words)] * sequences).SerializeToString()
    server.reset_peak()
    base = server.rss_mib()
    with grpc.insecure_channel(server.target, options=NOT_READING) as channel, \
            HealthProbe(server.target) as probe:
        started = time.perf_counter()
        call = channel.unary_stream(ANALYZE_STREAM)(request, timeout=300)
        stream = iter(call)
        next(stream)
        first = time.perf_counter() - started
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            time.sleep(0.25)
        held = server.rss_mib() - base
        peak = server.peak_mib() - base
        call.cancel()
    time.sleep(1.0)  # let the server notice the cancellation before reading its RSS
    return Outcome("unread stream 64x512 float32", "CANCELLED", first, peak, server.rss_mib(), probe.worst * 1000,
                   probe.failed, extra={"held_growth_mib": held})


def stream_with_garbage(timeout: float = 30.0) -> Callable[[grpc.Channel], tuple[str, str]]:
    """ModelStreamInfer: a valid request, then bytes that are no ModelInferRequest."""
    good = kpb.ModelInferRequest(
        model_name="minilm-l6", id="good",
        inputs=[kpb.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[1], contents=kpb.InferTensorContents(bytes_contents=[b"hello"]))],
        outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name="sequence_length")]).SerializeToString()

    def call(channel: grpc.Channel) -> tuple[str, str]:
        answers = channel.stream_stream(MODEL_STREAM_INFER)(iter([good, b"\xff\xff\xff\xff garbage"]),
                                                             timeout=timeout)
        got = sum(1 for _ in answers)
        return "OK", f"{got} answers and the stream ended"
    return call


def long_model_name(chars: int = 1_000_000) -> Callable[[grpc.Channel], tuple[str, str]]:
    request = pb.AnalyzeRequest(model="m" * chars, sequences=[pb.Sequence(text="hi")]).SerializeToString()

    def call(channel: grpc.Channel) -> tuple[str, str]:
        channel.unary_unary(ANALYZE)(request, timeout=30)
        return "OK", ""
    return call


def huge_shape(shape: list[int], raw: bool = False) -> Callable[[grpc.Channel], tuple[str, str]]:
    """input_ids of this shape with 16 raw bytes, or with (empty) typed contents."""
    def call(channel: grpc.Channel) -> tuple[str, str]:
        request = kpb.ModelInferRequest(model_name="minilm-l6", inputs=[
            kpb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=shape)],
            raw_input_contents=[b"\x00" * 16] if raw else [])
        channel.unary_unary(MODEL_INFER)(request.SerializeToString(), timeout=30)
        return "OK", ""
    return call


def undecodable() -> Callable[[grpc.Channel], tuple[str, str]]:
    def call(channel: grpc.Channel) -> tuple[str, str]:
        channel.unary_unary(ANALYZE)(b"\xff\xff\xff\xff\x0f", timeout=30)
        return "OK", ""
    return call


def cases(server: Server, skip: str = "") -> Iterator[Outcome]:
    def wanted(case: str) -> bool:
        return not (skip and re.search(skip, case))

    for case, call in _unary_cases():
        if wanted(case):
            yield measure(server, case, call)
    if wanted("unread stream"):
        yield unread_stream(server)
    if wanted("ModelStreamInfer with garbage"):
        yield measure(server, "ModelStreamInfer with garbage", stream_with_garbage())
    if wanted("model name"):
        before = server.log_bytes()
        outcome = measure(server, "1 M-character model name", long_model_name())
        outcome.extra["log_bytes"] = server.log_bytes() - before
        outcome.extra["reply_chars"] = len(outcome.details)
        yield outcome
    for case, call in (("shape [2^32, 2^32]", huge_shape([1 << 32, 1 << 32])),
                       ("undecodable Analyze", undecodable())):
        if wanted(case):
            yield measure(server, case, call)


def _unary_cases() -> list[tuple[str, Callable[[grpc.Channel], tuple[str, str]]]]:
    return [
        ("OIP top_k=2^20, one pair output", oip_top_k(1 << 20)),
        ("OIP top_k=2^20, three pair outputs", oip_top_k(1 << 20, ("pair_from_index", "pair_to_index",
                                                                  "pair_strength"))),
        ("OIP top_k=2^40", oip_top_k(1 << 40)),
        ("16 MiB of token ids (8.3 M)", many_ids()),
        ("16 MiB text", long_text()),
        ("6 x 16 MiB text at once", concurrently([long_text() for _ in range(6)])),
    ]


@contextmanager
def running(*args: str, server_src: Path | None = None) -> Iterator[Server]:
    server = Server(*args, server_src=server_src)
    try:
        yield server
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-src", type=Path, help="a checkout's server/ folder to run instead of this one")
    parser.add_argument("--json", type=Path, help="also write the outcomes here")
    parser.add_argument("--skip", default="", help="regular expression: cases whose name matches are not run")
    parser.add_argument("server_args", nargs="*", help="flags for attention-server (after --)")
    args = parser.parse_args(argv)
    outcomes = []
    with running(*args.server_args, server_src=args.server_src) as server:
        idle = server.rss_mib()
        print(f"server idle RSS {idle:.0f} MiB")
        print(f"{'case':38} {'code':>18} {'s':>7} {'peak+MiB':>9} {'RSS after':>9} {'health ms':>9} {'fail':>4}")
        for o in cases(server, args.skip):
            outcomes.append(o)
            extra = " ".join(f"{k}={v:.0f}" for k, v in o.extra.items())
            print(f"{o.case:38} {o.code:>18} {o.seconds:7.2f} {o.peak_growth_mib:9.0f} {o.rss_after_mib:9.0f} "
                  f"{o.health_worst_ms:9.0f} {o.health_failed:4d} {extra}", flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
