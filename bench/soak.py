"""`make soak`: a real `attention-server` process (port 0) under a mixed workload
from several client processes for minutes (default 5), to show it does not leak.

Every second it samples the server's RSS, open descriptors and threads against the
number of calls made. It prints calls and outcomes by status code (expected vs
unexpected), RSS at warm-up and at the end, the RSS slope after warm-up (MiB per
1,000 calls), peak RSS, descriptors and threads at start and end, then the goals:
no unexpected error; RSS at rest after the load under 5% above RSS at rest after
the warm-up; descriptors back to their start; threads back to their start or within
the pools the server starts lazily; the server's books (calls in flight, queued
work, reserved result bytes) at 0; peak RSS within idle RSS + the server's result
budget. Exit status 1 when a goal is missed. docs/soak.md tells more.

    python -m bench.soak --duration 60 --json soak.json -- --instances 1

Flags this module does not know go to the server (after `--` or mixed in).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "models" / "repository"
MiB = 1 << 20
GROWTH_TARGET_PCT = 5.0


# --- the workload (runs in the client processes) -----------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """One kind of call: how often it is drawn and which outcomes are expected."""

    name: str
    weight: int
    allowed: frozenset[str]
    run: Callable[[Caller], None]


class Caller:
    """One client process's connections and inputs."""

    def __init__(self, target: str, seed: int, call_timeout: float) -> None:
        from bench.workloads import text_of_length

        self.target = target
        self.timeout = call_timeout
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        self.short = [text_of_length(int(n), seed * 1000 + i) for i, n in enumerate(rng.integers(8, 49, 24))]
        self.mid = [text_of_length(int(n), seed * 1000 + 100 + i) for i, n in enumerate(rng.integers(64, 257, 12))]
        self.long = [text_of_length(int(n), seed * 1000 + 200 + i) for i, n in enumerate(rng.integers(384, 511, 6))]
        token = os.environ.get("ATTENTION_TOKEN")  # what the SDK sends too, for a server started with tokens
        self.auth = (("authorization", f"Bearer {token}"),) if token else ()
        self._client: Any = None
        self._channel: Any = None
        self._triton: Any = None

    def pick(self, pool: list[str], k: int = 1) -> list[str]:
        return [pool[int(i)] for i in self.rng.integers(0, len(pool), k)]

    def ids(self, n: int) -> list[int]:
        return [101, *(int(x) for x in self.rng.integers(1000, 29000, n - 2)), 102]

    @property
    def client(self) -> Any:
        """The SDK client, for the calls a user makes."""
        if self._client is None:
            from attention_client import AttentionClient

            self._client = AttentionClient(self.target, timeout=self.timeout)
        return self._client

    def raw(self, request: Any, stream: bool = False) -> None:
        """Send a hand-built message (or bytes) as another service would, past the SDK's own
        checks: bad requests must reach the server."""
        import grpc

        from attention_client.protocol import SERVICE_NAME

        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target)
        method = f"/{SERVICE_NAME}/{'AnalyzeStream' if stream else 'Analyze'}"
        data = request if isinstance(request, bytes) else request.SerializeToString()
        call = (self._channel.unary_stream if stream else self._channel.unary_unary)(method, None, None)
        result = call(data, timeout=self.timeout, metadata=self.auth)
        if stream:
            list(result)

    @property
    def triton(self) -> Any:
        if self._triton is None:
            import tritonclient.grpc as grpcclient

            self._triton = grpcclient.InferenceServerClient(self.target)
        return self._triton

    def close(self) -> None:
        """Close every connection (the server's descriptors for them go with it)."""
        for closeable in (self._client, self._triton, self._channel):
            if closeable is not None:
                closeable.close()
        self._client = self._channel = self._triton = None


def unary_short(c: Caller) -> None:
    """1-4 short texts, full float32 attention and hidden states."""
    c.client.analyze_batch(c.pick(c.short, int(c.rng.integers(1, 5))))


def unary_long_fp16(c: Caller) -> None:
    """One 384-510 token text, float16 attention."""
    c.client.analyze(c.pick(c.long)[0], attention_dtype="float16")


def top_k_only(c: Caller) -> None:
    """1-8 texts or token ids, pairs only (no matrices)."""
    seqs: list[Any] = c.pick(c.short + c.mid, int(c.rng.integers(1, 9)))
    seqs[0] = c.ids(int(c.rng.integers(8, 300)))
    c.client.analyze_batch(seqs, top_k=5, attention=False, hidden_states=False, exclude_special_tokens=True)


def word_level(c: Caller) -> None:
    """Word-level view with head statistics and rollout."""
    c.client.analyze(c.pick(c.mid)[0], word_level=True, top_k=3, head_statistics=True, rollout="mean",
                     hidden_states=False)


def stream(c: Caller) -> None:
    """2-6 sequences streamed and read to the end, one of them long, float32."""
    seqs = c.pick(c.short + c.mid, int(c.rng.integers(1, 6))) + c.pick(c.long)
    for _ in c.client.analyze_stream(seqs):
        pass


def stream_cancelled(c: Caller) -> None:
    """8 long sequences asked for, the stream cancelled after the first result."""
    results = c.client.analyze_stream(c.pick(c.long, 8))
    next(results)
    results.close()  # the SDK cancels the call


def slow_reader(c: Caller) -> None:
    """6 mid-length float32 results read one every 0.5 s."""
    for _ in c.client.analyze_stream(c.pick(c.mid, 6)):
        time.sleep(0.5)


def tiny_deadline(c: Caller) -> None:
    """Two long sequences (unary or stream) with a 1-50 ms deadline."""
    timeout = float(c.rng.uniform(0.001, 0.05))
    if c.rng.random() < 0.5:
        c.client.analyze_batch(c.pick(c.long, 2), timeout=timeout)
    else:
        for _ in c.client.analyze_stream(c.pick(c.long, 2), timeout=timeout):
            pass


def _request(texts: list[Any], model: str = "", **options: Any) -> Any:
    from attention_client.protocol import attention_pb2 as pb

    seqs = [pb.Sequence(token_ids=pb.TokenIds(ids=t)) if isinstance(t, list) else pb.Sequence(text=t) for t in texts]
    return pb.AnalyzeRequest(model=model, sequences=seqs, options=pb.AnalyzeOptions(**options))


BAD: list[Callable[[Caller], None]] = [
    lambda c: c.raw(_request([])),
    lambda c: c.raw(_request(["fine", "  "])),
    lambda c: c.raw(_request(["word " * 600])),
    lambda c: c.raw(_request([[101, 30522, 102]])),
    lambda c: c.raw(_request(c.pick(c.short), layers=[0, 6])),
    lambda c: c.raw(_request(c.pick(c.short), top_k=0)),
    lambda c: c.raw(_request(c.pick(c.short), top_k=1, min_strength=1.5)),
    lambda c: c.raw(_request(["x"] * 65)),
    lambda c: c.raw(bytes(c.rng.integers(0, 256, int(c.rng.integers(8, 512)), dtype=np.uint8))),
    lambda c: c.raw(_request([*c.pick(c.short), ""]), stream=True),
]


def bad_request(c: Caller) -> None:
    """A request the server must refuse with INVALID_ARGUMENT (empty, too long, out of range,
    undecodable bytes), built by hand: the SDK would refuse some before sending."""
    BAD[int(c.rng.integers(0, len(BAD)))](c)


def huge_text(c: Caller) -> None:
    """A 1.25 MB text (far over what 512 positions can hold): refused before tokenizing."""
    c.raw(_request(["word " * 250_000]))


def unknown_model(c: Caller) -> None:
    c.raw(_request(c.pick(c.short), model="no-such-model"))


def oip_infer(c: Caller) -> None:
    """Open Inference Protocol (tritonclient): text in, float16 attention and top-2 pairs out."""
    import tritonclient.grpc as grpcclient

    texts = np.array([[t] for t in c.pick(c.short + c.mid, int(c.rng.integers(1, 4)))], dtype=object)
    text = grpcclient.InferInput("text", list(texts.shape), "BYTES")
    text.set_data_from_numpy(texts)
    outputs = [grpcclient.InferRequestedOutput(n) for n in
               ("sequence_length", "attentions_fp16", "pair_from_index", "pair_to_index", "pair_strength")]
    c.triton.infer("minilm-l6", [text], outputs=outputs, parameters={"top_k": 2}, client_timeout=c.timeout)


def oip_stream(c: Caller) -> None:
    """Three token-id requests on one ModelStreamInfer stream."""
    import tritonclient.grpc as grpcclient

    ids = np.array([c.ids(32)], dtype=np.int64)
    inputs = []
    for name, value in (("input_ids", ids), ("attention_mask", np.ones_like(ids)),
                        ("token_type_ids", np.zeros_like(ids))):
        tensor = grpcclient.InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    answers: queue.Queue[Any] = queue.Queue()
    c.triton.start_stream(callback=lambda result, error: answers.put(error), stream_timeout=c.timeout)
    try:
        for k in range(3):
            c.triton.async_stream_infer("minilm-l6", inputs, request_id=str(k),
                                        outputs=[grpcclient.InferRequestedOutput("last_hidden_state")])
        for _ in range(3):
            error = answers.get(timeout=c.timeout)
            if error is not None:
                raise error
    finally:
        c.triton.stop_stream()


def oip_bad(c: Caller) -> None:
    """A float32 tensor where INT64 ids belong."""
    import tritonclient.grpc as grpcclient

    bad = grpcclient.InferInput("input_ids", [1, 2], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 2), np.float32))
    c.triton.infer("minilm-l6", [bad], client_timeout=c.timeout)


OK = frozenset({"OK"})
KINDS = [
    Kind("unary_short", 18, OK, unary_short),
    Kind("unary_long_fp16", 6, OK, unary_long_fp16),
    Kind("top_k_only", 14, OK, top_k_only),
    Kind("word_level", 8, OK, word_level),
    Kind("stream", 6, OK, stream),
    Kind("stream_cancelled", 6, OK, stream_cancelled),
    Kind("slow_reader", 2, OK, slow_reader),
    Kind("tiny_deadline", 8, frozenset({"OK", "DEADLINE_EXCEEDED"}), tiny_deadline),
    Kind("bad_request", 10, frozenset({"INVALID_ARGUMENT"}), bad_request),
    Kind("huge_text", 2, frozenset({"INVALID_ARGUMENT"}), huge_text),
    Kind("unknown_model", 2, frozenset({"NOT_FOUND"}), unknown_model),
    Kind("oip_infer", 4, OK, oip_infer),
    Kind("oip_stream", 2, OK, oip_stream),
    Kind("oip_bad", 2, frozenset({"INVALID_ARGUMENT"}), oip_bad),
]

# The priming burst: cheap kinds that reach every pool (parsing and planning off the event
# loop, both compute instances), BURST_WIDTH at once per client process.
BURST = ("huge_text", "unary_short", "top_k_only")
BURST_WIDTH = 4


def _code(exc: BaseException) -> str:
    """The gRPC status name of a failed call, whichever client raised it; "client ..." for a
    call the SDK refused before sending (never expected: every call here is well formed)."""
    import grpc

    if not isinstance(exc, grpc.RpcError) and not isinstance(exc.__cause__, grpc.RpcError) \
            and not hasattr(exc, "status"):
        return f"client {type(exc).__name__}"
    code = getattr(exc, "code", None)
    if callable(code):  # grpc.RpcError
        code = code()
    if code is not None and hasattr(code, "name"):  # AttentionError.code, grpc.StatusCode
        return str(code.name)
    status = getattr(exc, "status", None)  # tritonclient's InferenceServerException: "StatusCode.X"
    if callable(status) and status():
        return str(status()).rsplit(".", 1)[-1]
    return f"client {type(exc).__name__}"


class Tally:
    """Outcomes by (kind, code), durations of the timed calls, a few unexpected errors' messages."""

    def __init__(self) -> None:
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.seconds: dict[str, list[float]] = {}
        self.notes: list[str] = []
        self.priming = 0
        self._lock = threading.Lock()

    def call(self, caller: Caller, kind: Kind, timed: bool = True) -> None:
        """Run one call of `kind` and count its outcome."""
        started = time.perf_counter()
        note = ""
        try:
            kind.run(caller)
            code = "OK"
        except Exception as exc:  # noqa: BLE001 (every failure is an outcome to count)
            code = _code(exc)
            details = getattr(exc, "details", None)
            note = f"{kind.name}: {code}: {(details() if callable(details) else details or str(exc))[:300]}"
        if code == "OK":
            note = f"{kind.name}: succeeded but should have failed"
        with self._lock:
            self.outcomes[kind.name, code] += 1
            if code not in kind.allowed and len(self.notes) < 20:
                self.notes.append(note)
            if timed:
                self.seconds.setdefault(kind.name, []).append(time.perf_counter() - started)
            else:
                self.priming += 1

    def report(self, index: int) -> dict[str, Any]:
        return {"index": index, "outcomes": [[k, c, n] for (k, c), n in self.outcomes.items()],
                "notes": self.notes, "seconds": self.seconds, "priming_calls": self.priming}


def prime(caller: Caller, tally: Tally, every_kind: bool) -> None:
    """One call of each kind (first use of every code path), then a burst of concurrent calls:
    the server starts its pool threads lazily (one per task that finds none idle, never ended);
    the burst starts most of those the run will need before the start figures are taken."""
    from concurrent.futures import ThreadPoolExecutor

    for kind in KINDS if every_kind else ():
        tally.call(caller, kind, timed=False)
    burst = [k for k in KINDS if k.name in BURST] * 4
    caller.client  # noqa: B018 (connect before the threads share the client)
    with ThreadPoolExecutor(BURST_WIDTH) as pool:
        list(pool.map(lambda kind: tally.call(caller, kind, timed=False), burst))


def worker(index: int, target: str, seed: int, call_timeout: float, phases: list[float], max_calls: int,
           counts: Any, ready: Any, gates: list[Any], stop: Any, results: Any) -> None:
    """One client process: priming (see prime), then for each phase (warm-up, the rest), once its
    gate opens, the weighted mix one call at a time until the phase's time or the call count is up.
    Says `ready` after priming and after each phase (then none of its calls is in flight)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and sets `stop`
    from attention_client import tune_malloc

    tune_malloc()
    caller = Caller(target, seed + index, call_timeout)
    tally = Tally()
    prime(caller, tally, every_kind=index == 0)
    caller.close()  # the start figures are taken with no client connected
    ready.put(index)
    weights = np.array([k.weight for k in KINDS], dtype=float)
    weights /= weights.sum()
    n = 0
    for seconds, gate in zip(phases, gates, strict=True):
        if not gate.wait(3600) or stop.is_set():
            break
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at and n < max_calls and not stop.is_set():
            tally.call(caller, KINDS[int(caller.rng.choice(len(KINDS), p=weights))])
            n += 1
            counts[index] = n
        ready.put(index)
    caller.close()
    results.put(tally.report(index))


# --- the server and its figures (the parent process) -------------------------------------------------------------

def proc_figures(pid: int) -> dict[str, int]:
    """RSS and peak RSS (KiB), threads, open descriptors of a process, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


class Server:
    """`python -m attention_server` on port 0; stderr (its log) goes to a file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = ["--host", "127.0.0.1", "--port", "0", "--model-repository", str(REPOSITORY),
                     "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--http-port", "-1", *args]
        self.log_path = log_path

    def __enter__(self) -> Server:
        self._log = open(self.log_path, "w")  # closed in __exit__
        self.proc = subprocess.Popen([sys.executable, "-m", "attention_server", *self.args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline() if select.select([self.proc.stdout], [], [], 300)[0] else ""
        match = re.search(r"listening on .*:(\d+)$", line.strip())
        if not match:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(f"server did not start: {line!r}\n{self.log_path.read_text()[-3000:]}")
        self.target = f"127.0.0.1:{match.group(1)}"
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # never let stdout fill up
        return self

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (graceful drain), then the exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()


class Sampler(threading.Thread):
    """Samples the server's figures and the cumulative number of calls every `interval` seconds."""

    def __init__(self, pid: int, counts: Any, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.counts, self.interval = pid, counts, interval
        self.samples: list[dict[str, float]] = []
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                figures = proc_figures(self.pid)
            except OSError:  # the process is gone
                return
            self.samples.append({"t": round(time.monotonic() - self.t0, 2), "calls": int(sum(self.counts)),
                                 **figures})
            self._halt.wait(self.interval)

    def halt(self) -> None:
        self._halt.set()
        self.join(5)


def settle(pid: int, target: dict[str, int] | None, quiet: float, timeout: float) -> dict[str, Any]:
    """Poll descriptors and threads until they equal `target` (twice in a row) or stop changing for
    `quiet` seconds; give up after `timeout`. Returns the last figures and the seconds it took."""
    started = time.monotonic()
    last = proc_figures(pid)
    since, matched = started, 0
    while time.monotonic() - started < timeout:
        time.sleep(0.5)
        now = proc_figures(pid)
        key = (now["fds"], now["Threads"])
        matched = matched + 1 if target is not None and key == (target["fds"], target["Threads"]) else 0
        if key != (last["fds"], last["Threads"]):
            since = time.monotonic()
        last = now
        if matched >= 2 or time.monotonic() - since >= quiet:
            break
    return {**last, "settle_s": round(time.monotonic() - started, 1)}


BOOKS = ("attention_inflight_requests", "attention_queue_depth", "attention_queue_tokens",
         "attention_pending_result_bytes")


def server_books(log_path: Path) -> dict[str, float] | None:
    """The server's own count of calls in flight, queued work and reserved result bytes (each
    summed over its labels), from its Prometheus endpoint; None when it has none."""
    import urllib.request

    match = re.search(r"metrics on (http://\S+/metrics)", log_path.read_text(errors="replace"))
    if not match:
        return None
    try:
        with urllib.request.urlopen(match.group(1), timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    books = dict.fromkeys(BOOKS, 0.0)
    for line in text.splitlines():
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        if name in books:
            books[name] += float(line.rsplit(" ", 1)[1])
    return books


def slope_per_1000(samples: list[dict[str, float]]) -> float | None:
    """Least-squares RSS (MiB) against cumulative calls, in MiB per 1,000 calls."""
    x = np.array([s["calls"] for s in samples], dtype=float)
    y = np.array([s["VmRSS"] / 1024 for s in samples], dtype=float)
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    return float(np.polyfit(x, y, 1)[0] * 1000)


def wait_ready(ready: Any, workers: list[Any], timeout: float, progress: Callable[[], None] | None = None) -> None:
    """Wait until every client process says ready (primed, or done with a phase); fail early if
    one died first. `progress` is called every 30 s."""
    deadline = time.monotonic() + timeout
    next_progress = time.monotonic() + 30
    pending = set(range(len(workers)))
    while pending:
        try:
            pending.discard(ready.get(timeout=1))
            continue
        except queue.Empty:
            pass
        gone = [i for i in pending if workers[i].exitcode is not None]
        if gone:  # its last message may have arrived meanwhile
            while not ready.empty():
                pending.discard(ready.get())
            gone = [workers[i].name for i in pending if workers[i].exitcode is not None]
        if gone or time.monotonic() > deadline:
            raise RuntimeError(f"client processes not ready: {gone or 'timed out'}")
        if progress is not None and time.monotonic() > next_progress:
            progress()
            next_progress += 30


def run(args: argparse.Namespace, server_args: list[str]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # no grpc state crosses a fork
    counts = ctx.Array("q", args.workers, lock=False)
    ready, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    phases = [args.warmup * args.duration, (1 - args.warmup) * args.duration]
    gates = [ctx.Event() for _ in phases]
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(args.server_log or Path(tmp) / "server.log")
        with Server(server_args, log_path) as server:
            pid = server.proc.pid
            sampler = Sampler(pid, counts)
            sampler.start()

            def progress() -> None:
                if server.proc.poll() is not None:
                    raise RuntimeError(f"the server exited ({server.proc.returncode}) under load; its log ends:\n"
                                       f"{log_path.read_text(errors='replace')[-3000:]}")
                s = sampler.samples[-1]
                say(f"{s['calls']} calls, RSS {s['VmRSS'] / 1024:.0f} MiB, fds {s['fds']}, threads {s['Threads']}")

            say(f"server pid {pid} on {server.target}; {args.workers} client processes, {args.duration:.0f} s")
            idle = settle(pid, None, min(args.quiet, 2), args.settle_timeout)  # informational only
            workers = [ctx.Process(target=worker, name=f"soak-{i}", args=(
                i, server.target, args.seed, args.call_timeout, phases, args.max_calls, counts, ready, gates,
                stop, results)) for i in range(args.workers)]
            for w in workers:
                w.start()
            try:
                wait_ready(ready, workers, args.call_timeout * len(KINDS))
                say("primed (per process: one call of each kind, then a burst of concurrent calls); settling")
                start = settle(pid, None, args.quiet, args.settle_timeout)
                gates[0].set()
                load_started = time.monotonic() - sampler.t0
                say(f"warm-up: {phases[0]:.0f} s")
                wait_ready(ready, workers, phases[0] + args.call_timeout + 60, progress)
                paused = time.monotonic() - sampler.t0
                warm = settle(pid, None, min(args.quiet, 2), args.settle_timeout)
                say(f"warm-up over: RSS {warm['VmRSS'] / 1024:.0f} MiB with no call in flight; "
                    f"{phases[1]:.0f} s more")
                gates[1].set()
                resumed = time.monotonic() - sampler.t0
                wait_ready(ready, workers, phases[1] + args.call_timeout + 60, progress)
                reports = [results.get(timeout=60) for _ in workers]
            except KeyboardInterrupt:
                say("interrupted: stopping the clients")
                raise
            finally:
                stop.set()  # a process still in a phase (after an error here) stops after its call
                for gate in gates:
                    gate.set()
                for w in workers:
                    w.join(args.call_timeout + 10)
                    if w.is_alive():
                        w.terminate()
            load_ended = time.monotonic() - sampler.t0
            say("load over; waiting for descriptors and threads to settle")
            end = settle(pid, start, args.quiet, args.settle_timeout)
            books = server_books(log_path)
            sampler.halt()
            exit_code = server.stop(args.call_timeout)
        log_text = log_path.read_text(errors="replace")
    times = {"load_started": load_started, "paused": paused, "resumed": resumed, "load_ended": load_ended}
    return summarize(args, sampler.samples, {"idle": idle, "start": start, "warm": warm, "end": end}, times,
                     reports, books, exit_code, log_text)


def summarize(args: argparse.Namespace, samples: list[dict[str, float]], at: dict[str, dict[str, Any]],
              times: dict[str, float], reports: list[dict[str, Any]], books: dict[str, float] | None,
              exit_code: int | None, log_text: str) -> dict[str, Any]:
    """The figures and goals of a run. `at`: the server's figures when settled at idle, at the start
    (after priming), after warm-up and at the end; `times`: when the phases began and ended;
    `books`: the server's own counts at the end (server_books)."""
    idle, start, warm, end = at["idle"], at["start"], at["warm"], at["end"]
    allowed = {k.name: k.allowed for k in KINDS}
    by_kind: dict[str, dict[str, int]] = {}
    expected: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    latency: dict[str, list[float]] = {}
    for r in reports:
        for kind, code, n in r["outcomes"]:
            by_kind.setdefault(kind, {})[code] = by_kind.get(kind, {}).get(code, 0) + n
            if code not in allowed[kind]:
                unexpected[code] += n
            elif code != "OK":
                expected[code] += n
        for kind, values in r["seconds"].items():
            latency.setdefault(kind, []).extend(values)
    if len(reports) < args.workers:
        unexpected["client process did not report"] += args.workers - len(reports)
    calls = sum(sum(codes.values()) for codes in by_kind.values())
    priming = sum(r["priming_calls"] for r in reports)
    load_seconds = times["load_ended"] - times["load_started"] - (times["resumed"] - times["paused"])
    latency_ms = {k: {"calls": len(v), "p50": round(1000 * float(np.median(v)), 1),
                      "p99": round(1000 * float(np.percentile(v, 99)), 1), "max": round(1000 * max(v), 1)}
                  for k, v in latency.items()}
    after_warmup = [s for s in samples if times["resumed"] <= s["t"] <= times["load_ended"]]
    # Both RSS figures are taken with no call in flight (a sample under load swings by hundreds of
    # MiB as large results come and go): what the server keeps after the warm-up, and after all.
    growth = 100 * (end["VmRSS"] - warm["VmRSS"]) / warm["VmRSS"]
    peak = max([end["VmHWM"], *(s["VmHWM"] for s in samples)])
    slope = slope_per_1000(after_warmup)
    ceiling = idle["Threads"] + args.bounds["pool_threads"]
    budget = args.bounds["result_budget_mib"]
    goals = [
        {"goal": "unexpected errors", "measured": sum(unexpected.values()), "target": "0", "met": not unexpected},
        {"goal": "RSS growth after warm-up, %", "measured": round(growth, 2), "target": f"< {GROWTH_TARGET_PCT:g}",
         "met": growth < GROWTH_TARGET_PCT},
        {"goal": "open descriptors, end vs start", "measured": f"{end['fds']} vs {start['fds']}",
         "target": "equal", "met": end["fds"] == start["fds"]},
        # The server starts pool threads lazily (one when a task finds none idle) and keeps them:
        # one the run needed and priming did not is no leak, as long as all stay within the pools.
        {"goal": "threads, end vs start", "measured": f"{end['Threads']} vs {start['Threads']}",
         "target": f"<= start, or more within the lazily started pools (<= {ceiling} = idle {idle['Threads']} + "
                   f"{args.bounds['pool_threads']})",
         "met": end["Threads"] <= max(start["Threads"], ceiling)},
    ]
    if books is not None:
        goals.append({"goal": "server's books at the end (calls in flight, queued, reserved bytes)",
                      "measured": ", ".join(f"{v:g}" for v in books.values()), "target": "all 0",
                      "met": not any(books.values())})
    if budget is None:
        goals.append({"goal": "peak RSS, MiB", "measured": round(peak / 1024), "target": "reported", "met": True})
    else:
        bound = idle["VmRSS"] / 1024 + budget
        goals.append({"goal": "peak RSS, MiB", "measured": round(peak / 1024),
                      "target": f"<= {bound:.0f} (idle {idle['VmRSS'] / 1024:.0f} + result budget {budget})",
                      "met": peak / 1024 <= bound})
    mib = {name: round(fig["VmRSS"] / 1024, 1) for name, fig in at.items()}
    return {
        "duration_s": args.duration, "workers": args.workers, "warmup_fraction": args.warmup,
        "load_seconds": round(load_seconds, 1), "calls": calls, "priming_calls": priming,
        "calls_per_s": round((calls - priming) / load_seconds, 1),
        "outcomes_by_kind": by_kind, "latency_ms": latency_ms,
        "expected_errors": dict(expected), "unexpected_errors": dict(unexpected),
        "unexpected_examples": [n for r in reports for n in r["notes"]][:20],
        "rss_mib": {**mib, "peak": round(peak / 1024, 1),
                    "load_max": round(max(s["VmRSS"] for s in after_warmup) / 1024, 1) if after_warmup else None},
        "rss_growth_after_warmup_pct": round(growth, 2),
        "rss_slope_mib_per_1000_calls": None if slope is None else round(slope, 3),
        "fds": {**{name: fig["fds"] for name, fig in at.items()}, "peak": max(s["fds"] for s in samples)},
        "threads": {**{name: fig["Threads"] for name, fig in at.items()}, "peak": max(s["Threads"] for s in samples)},
        "settle_s": {name: fig["settle_s"] for name, fig in at.items()},
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "server_bounds": args.bounds, "server_books_at_end": books, "server_exit_code": exit_code,
        "server_log": {"lines": log_text.count("\n"), "bytes": len(log_text),
                       "errors": sum(" ERROR " in line or '"ERROR"' in line for line in log_text.splitlines()),
                       "tracebacks": log_text.count("Traceback (most recent call last)")},
        "goals": goals, "all_met": all(g["met"] for g in goals),
        "samples": samples,
    }


def report(s: dict[str, Any]) -> str:
    rss, fds, threads = s["rss_mib"], s["fds"], s["threads"]
    slope = s["rss_slope_mib_per_1000_calls"]
    lines = [
        f"calls: {s['calls']} ({s['priming_calls']} priming, then {s['calls_per_s']:.1f}/s for "
        f"{s['load_seconds']:.0f} s), {s['workers']} client processes",
        f"expected errors: {_codes(s['expected_errors'])}",
        f"unexpected errors: {_codes(s['unexpected_errors'])}",
        *(f"  {n}" for n in s["unexpected_examples"]),
        "",
        "| kind | outcomes | p50 ms | p99 ms | max ms |", "|---|---|---:|---:|---:|",
        *(f"| {k.name} | {_codes(s['outcomes_by_kind'].get(k.name, {}))} | {lat.get('p50', '')} | "
          f"{lat.get('p99', '')} | {lat.get('max', '')} |" for k in KINDS for lat in [s["latency_ms"].get(k.name, {})]),
        "",
        f"RSS MiB, no call in flight: idle {rss['idle']:.0f}, start {rss['start']:.0f}, after warm-up "
        f"{rss['warm']:.0f}, end {rss['end']:.0f}; under load after warm-up up to {rss['load_max'] or 0:.0f}; "
        f"peak {rss['peak']:.0f}",
        f"RSS slope after warm-up: {'n/a' if slope is None else f'{slope:+.1f}'} MiB per 1,000 calls "
        "(least squares over the 1 s samples)",
        f"descriptors: idle {fds['idle']}, start {fds['start']}, after warm-up {fds['warm']}, peak {fds['peak']}, "
        f"end {fds['end']}",
        f"threads: idle {threads['idle']}, start {threads['start']}, after warm-up {threads['warm']}, "
        f"peak {threads['peak']}, end {threads['end']}",
        f"server: exit code {s['server_exit_code']} after SIGTERM; log {s['server_log']['lines']} lines, "
        f"{s['server_log']['errors']} ERROR, {s['server_log']['tracebacks']} tracebacks",
        "",
        "| goal | measured | target | met |", "|---|---:|---|---|",
        *(f"| {g['goal']} | {g['measured']} | {g['target']} | {'yes' if g['met'] else 'NO'} |" for g in s["goals"]),
    ]
    return "\n".join(lines)


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{c} {n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def server_bounds(server_args: list[str]) -> dict[str, int | None]:
    """What the server's settings (these flags, the environment, the defaults) bound:
    `result_budget_mib`, its memory budget for results waiting to be sent (None for a server
    without one), and `pool_threads`, the most threads it starts lazily and keeps: asyncio's
    default executor (asyncio.to_thread) and, per loaded model, the batcher's compute and
    post pools of `instances` threads each (server/attention_server/runtime/batcher.py)."""
    from attention_server.settings import Settings

    settings = Settings(_cli_parse_args=server_args)
    models = len(settings.models) or sum(1 for m in settings.model_repository.glob("*/model.json"))
    instances = settings.instances or len(os.sched_getaffinity(0))
    return {"result_budget_mib": getattr(settings, "max_pending_result_mib", None),
            "pool_threads": min(32, (os.cpu_count() or 1) + 4) + 2 * instances * models}


_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300, help="seconds of load (default 300)")
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the load counted as warm-up")
    parser.add_argument("--max-calls", type=int, default=10**9, help="per client process")
    parser.add_argument("--call-timeout", type=float, default=60, help="deadline of every ordinary call")
    parser.add_argument("--settle-timeout", type=float, default=60, help="longest wait for fds/threads to settle")
    parser.add_argument("--quiet", type=float, default=5, help="seconds without change that count as settled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the summary (with every sample) here")
    parser.add_argument("--server-log", type=Path, help="keep the server's log here")
    args, server_args = parser.parse_known_args(argv[:split])
    server_args += argv[split + 1:]
    args.bounds = server_bounds(["--model-repository", str(REPOSITORY), *server_args])
    summary = run(args, server_args)
    summary["server_args"] = server_args
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(report(summary))
    return 0 if summary["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
