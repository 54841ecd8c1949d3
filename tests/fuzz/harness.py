"""The fuzz suite's view of a real server process: raw calls by method name, the
properties every reply must have, and the server's health (still serving, RSS,
stderr) between examples."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
import numpy as np
from hypothesis import event, settings

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_server._proto.inference import grpc_service_pb2 as kpb
from tests.helpers import ServerProcess

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
# Examples per test: the number given in the ci profile, ten times as many in `long`.
SCALE = 10 if PROFILE == "long" else 1

MODEL = "minilm-l6"
ATTENTION = "/attention.v1.AttentionService/"
INFERENCE = "/inference.GRPCInferenceService/"

# Every reply arrives within this; a small request that runs into it is a failure.
REPLY_SECONDS = 10.0
# Longest status message (or stream error_message) a reply may carry: caller
# values are quoted cut short, never echoed whole.
MAX_DETAILS = 4096
# The server's RSS at the end of a module stays under its idle RSS plus this.
RSS_HEADROOM_KIB = 1024 * 1024

# Statuses no input may produce: the server failed, hung, or died.
BAD_CODES = {
    grpc.StatusCode.INTERNAL: "INTERNAL",
    grpc.StatusCode.UNKNOWN: "UNKNOWN",
    grpc.StatusCode.DEADLINE_EXCEEDED: f"no reply within {REPLY_SECONDS:.0f} s",
    grpc.StatusCode.UNAVAILABLE: "server unavailable",
    grpc.StatusCode.UNIMPLEMENTED: "UNIMPLEMENTED",
    grpc.StatusCode.DATA_LOSS: "DATA_LOSS",
    grpc.StatusCode.CANCELLED: "CANCELLED",
}
# What a reply must never show: a traceback, a path of the server, an exception class.
LEAKS = [
    re.compile(r"Traceback"),
    re.compile(r'File "'),
    re.compile(r"/work\b|site-packages|/usr/lib|/home/|\.py\b"),
    re.compile(r"<class\b|\b[A-Z][A-Za-z]*(?:Error|Exception)\b|\bstruct\.error\b"),
]

GOOD_REQUEST = pb.AnalyzeRequest(
    sequences=[pb.Sequence(text="The server still answers.")],
    options=pb.AnalyzeOptions(attention=False, hidden_states=False, top_k=1),
).SerializeToString()


def examples(ci: int) -> settings:
    """Settings for one fuzz test: `ci` examples in the ci profile, 10x in long."""
    return settings(max_examples=ci * SCALE)


@dataclass
class Reply:
    """What one call came back with: the status, its details, the messages."""

    method: str
    code: grpc.StatusCode
    details: str
    messages: list[bytes]
    seconds: float


@dataclass
class Ledger:
    """Per module: RSS before and after each example, to name the request that grew it most."""

    idle_kib: int = 0
    biggest_growth_kib: int = 0
    biggest_growth_case: str = ""
    examples: dict[str, int] = field(default_factory=dict)


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def _excerpt(data: bytes | str, limit: int = 300) -> str:
    text = repr(data)
    unit = "bytes" if isinstance(data, bytes) else "chars"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(data)} {unit})"


class FuzzServer:
    """A `python -m attention_server` process and one channel to it."""

    def __init__(self) -> None:
        self.process = ServerProcess()
        self.channel: grpc.Channel | None = None
        self.ledger = Ledger()
        self._stderr_seen = 0
        self._last_rss = 0
        self._barriers = 0
        self._barrier_logged = False

    def __enter__(self) -> FuzzServer:
        self.process.__enter__()
        self.channel = grpc.insecure_channel(self.process.target, options=[
            ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
            # The echo bug turns into a client-side metadata error: see it as such, not as a crash.
            ("grpc.max_metadata_size", 64 * 1024),
        ])
        grpc.channel_ready_future(self.channel).result(30)
        for _ in range(5):
            self.assert_serving()
        self.ledger.idle_kib = self._last_rss = self.rss_kib()
        self._barrier_logged = self._barrier()
        self._stderr_seen = len(self.process.stderr())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.channel is not None:
            self.channel.close()
        self.process.__exit__(*exc)

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def rss_kib(self) -> int:
        return _status_kib(self.pid, "VmRSS")

    def peak_kib(self) -> int:
        return _status_kib(self.pid, "VmHWM")

    # -- calls -----------------------------------------------------------------------------

    def unary(self, method: str, payload: bytes) -> Reply:
        """Send `payload` as the request message of a unary method, unparsed."""
        assert self.channel is not None
        call = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        start = time.monotonic()
        try:
            response, rpc = call.with_call(payload, timeout=REPLY_SECONDS)
            return Reply(method, rpc.code(), rpc.details() or "", [response], time.monotonic() - start)
        except grpc.RpcError as err:
            return Reply(method, err.code(), err.details() or "", [], time.monotonic() - start)

    def server_stream(self, method: str, payload: bytes) -> Reply:
        """A unary-stream call: every message the server sends, then its status."""
        assert self.channel is not None
        call = self.channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        start = time.monotonic()
        it = call(payload, timeout=REPLY_SECONDS)
        messages: list[bytes] = []
        try:
            messages.extend(it)
            return Reply(method, it.code(), it.details() or "", messages, time.monotonic() - start)
        except grpc.RpcError as err:
            return Reply(method, err.code(), err.details() or "", messages, time.monotonic() - start)

    def bidi(self, method: str, payloads: Iterable[bytes]) -> Reply:
        """A stream-stream call: send every payload, half-close, read to the end."""
        assert self.channel is not None
        call = self.channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        start = time.monotonic()
        it = call(iter(list(payloads)), timeout=REPLY_SECONDS)
        messages: list[bytes] = []
        try:
            messages.extend(it)
            return Reply(method, it.code(), it.details() or "", messages, time.monotonic() - start)
        except grpc.RpcError as err:
            return Reply(method, err.code(), err.details() or "", messages, time.monotonic() - start)

    # -- properties ------------------------------------------------------------------------

    def check(self, reply: Reply, sent: bytes | Iterable[bytes], texts: Iterable[str] = ()) -> None:
        """The properties of every reply, then the server's health. `texts`: more
        strings from the reply (a stream's error_message) held to the same rules."""
        sent_bytes = sent if isinstance(sent, bytes) else b"".join(sent)
        name = reply.method.rsplit("/", 1)[-1]
        self.ledger.examples[name] = self.ledger.examples.get(name, 0) + 1
        event(reply.code.name)  # the outcome table in --hypothesis-show-statistics
        where = f"{name} -> {reply.code.name} {_excerpt(reply.details)} after {reply.seconds:.2f} s"
        assert reply.code not in BAD_CODES, f"{BAD_CODES[reply.code]}: {where}"
        if reply.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert "metadata" not in reply.details.lower(), f"oversized error echo: {where}"
        assert reply.seconds < REPLY_SECONDS, f"slow reply: {where}"
        for text in [reply.details, *texts]:
            assert len(text) <= MAX_DETAILS, f"{len(text)}-character message (limit {MAX_DETAILS}): {where}"
            for pattern in LEAKS:
                found = pattern.search(text)
                if found and found.group(0).encode() not in sent_bytes:  # quoting the caller is fine
                    raise AssertionError(f"reply shows {found.group(0)!r}: {_excerpt(text, 600)} ({where})")
        self.assert_serving(after=where)
        self.assert_no_new_traceback(after=where)
        rss = self.rss_kib()
        growth, self._last_rss = rss - self._last_rss, rss
        if growth > self.ledger.biggest_growth_kib:
            self.ledger.biggest_growth_kib = growth
            self.ledger.biggest_growth_case = where

    def assert_serving(self, after: str = "start") -> None:
        """A known-good Analyze still succeeds, promptly."""
        reply = self.unary(ATTENTION + "Analyze", GOOD_REQUEST)
        assert reply.code == grpc.StatusCode.OK, (
            f"server stopped serving after {after}: good Analyze -> {reply.code.name} {reply.details!r}; "
            f"exit code {self.process.proc.poll() if self.process.proc else None}; "
            f"stderr tail: {self.process.stderr()[-2000:]}")
        results = pb.AnalyzeResponse.FromString(reply.messages[0]).results
        assert len(results) == 1 and len(results[0].tokens) == 7

    def _barrier(self) -> bool:
        """Wait until everything the server logged for the calls so far has been read:
        ask for a model named by a counter (NOT_FOUND, logged with the name) and wait
        for that line. False when the line does not come (the server logs less)."""
        self._barriers += 1
        name = f"fuzz-barrier-{self._barriers}"
        self.unary(ATTENTION + "GetModel", pb.GetModelRequest(name=name).SerializeToString())
        deadline = time.monotonic() + (2.0 if self._barrier_logged else 0.2)
        while time.monotonic() < deadline:
            if name in self.process.stderr()[self._stderr_seen:]:
                return True
            time.sleep(0.001)
        return False

    def assert_no_new_traceback(self, after: str) -> None:
        if self._barrier_logged:
            self._barrier()
        else:
            time.sleep(0.05)  # a server that logs less: give its last lines time to arrive
        text = self.process.stderr()
        new, self._stderr_seen = text[self._stderr_seen:], len(text)
        assert "Traceback" not in new, f"server logged a traceback after {after}:\n{new[-3000:]}"

    def assert_healthy_at_end(self) -> None:
        """Module end: RSS under idle + headroom, no traceback in everything logged."""
        self.assert_serving(after="the module")
        rss, peak, idle = self.rss_kib(), self.peak_kib(), self.ledger.idle_kib
        text = self.process.stderr()
        if "Traceback" in text:
            start = max(0, text.index("Traceback") - 500)
            raise AssertionError(f"server stderr holds a traceback:\n{text[start:start + 3000]}")
        assert rss < idle + RSS_HEADROOM_KIB, (
            f"server RSS {rss // 1024} MiB after the module (idle {idle // 1024} MiB, peak {peak // 1024} MiB, "
            f"bound idle + {RSS_HEADROOM_KIB // 1024} MiB); biggest growth "
            f"{self.ledger.biggest_growth_kib // 1024} MiB after {self.ledger.biggest_growth_case}")


ITEMSIZE = {pb.DATA_TYPE_FLOAT32: 4, pb.DATA_TYPE_FLOAT16: 2, pb.DATA_TYPE_INT32: 4, pb.DATA_TYPE_INT64: 8}
KSERVE_ITEMSIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2,
                   "INT32": 4, "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8}


def _tensor_ok(tensor: pb.Tensor, what: str) -> None:
    if not tensor.data and not tensor.shape:
        return  # absent
    size = int(np.prod(list(tensor.shape), dtype=object)) * ITEMSIZE[tensor.dtype]
    assert len(tensor.data) == size, f"{what}: shape {list(tensor.shape)} with {len(tensor.data)} bytes"


def check_sequence_result(result: pb.SequenceResult) -> None:
    """A successful result is self-consistent: every tensor's bytes match its shape."""
    for name in ("attention", "hidden_states", "word_attention", "rollout"):
        _tensor_ok(getattr(result, name), f"results[{result.index}].{name}")


def check_analyze_response(data: bytes, request: bytes) -> None:
    response = pb.AnalyzeResponse.FromString(data)
    sent = pb.AnalyzeRequest.FromString(request)
    assert len(response.results) == len(sent.sequences), f"{len(response.results)} results for {len(sent.sequences)}"
    for i, result in enumerate(response.results):
        assert result.index == i
        check_sequence_result(result)


def check_infer_response(response: kpb.ModelInferResponse, request: kpb.ModelInferRequest) -> None:
    """Outputs as asked, one raw_output_contents entry each, bytes matching shape and datatype."""
    asked = [o.name for o in request.outputs]
    names = [o.name for o in response.outputs]
    assert not asked or names == asked, f"outputs {names} for {asked}"
    assert len(response.raw_output_contents) == len(response.outputs)
    for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        count = int(np.prod(list(out.shape), dtype=object))
        if out.datatype == "BYTES":
            pos = n = 0
            while pos < len(raw):
                pos += 4 + int.from_bytes(raw[pos:pos + 4], "little")
                n += 1
            assert pos == len(raw) and n == count, f"{out.name}: BYTES {list(out.shape)} with {n} elements"
        else:
            assert len(raw) == count * KSERVE_ITEMSIZE[out.datatype], (
                f"{out.name}: {out.datatype} {list(out.shape)} with {len(raw)} bytes")


def stream_errors(messages: list[bytes]) -> list[str]:
    """The error_message of each ModelStreamInfer response."""
    return [kpb.ModelStreamInferResponse.FromString(m).error_message for m in messages]
