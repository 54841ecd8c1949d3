"""Dynamic batching: sequences of concurrent requests are merged into runtime
batches of one model, grouped by length, within size, token and memory limits.

Pipeline: the event loop only queues and forms batches; ONNX Runtime runs in
compute threads (see `_step` for which session); cutting, pair extraction and
the caller's `finish` (e.g. wire encoding) run in the compute thread for small
batches and in a post-processing thread for large ones, so the next batch
computes while the previous one is being cut and encoded.

Backpressure: the queue is bounded by tokens; a submission that does not fit is
refused at once (ResourceExhausted). A sequence whose deadline passes while it
waits, or whose call is cancelled, leaves the queue and never reaches the runtime.

Lifecycle: `stop_accepting` refuses new calls (the queue is no longer held for
company that cannot come); `close` fails what is queued, lets the batches already
running deliver, and waits for the threads off the event loop.

Tracing (optional `TraceHooks`, attention_server.tracing): each job keeps its
call's trace from submit, and every runtime batch is reported as it starts and
ends. Without hooks the batcher records nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import DeadlineExceeded, ResourceExhausted, TooLarge, Unavailable
from .onnx_model import pad_batch
from .results import cut, outputs_for
from .stats import BatcherStats, BatchObserver

if TYPE_CHECKING:
    from .types import LoadedModel, Plan

log = logging.getLogger(__name__)
# Destinations for a sequence's graph outputs (by output name, with the batch axis) when
# it runs alone in its batch, e.g. a response laid out before the run; None: let ONNX
# Runtime allocate them. Called in the compute thread with the sequence's index in its plan.
Into = Callable[[int], Mapping[str, np.ndarray] | None]

# Batches whose float32 attention is smaller than this are cut in the compute thread.
INLINE_POST_BYTES = 4 << 20
# A batch may waste at most this share of padded tokens (plus a small allowance:
# for short sequences a run's fixed cost outweighs the padding).
PADDING_WASTE = 0.2
PADDING_ALLOWANCE = 64


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 64
    """Most sequences in one runtime batch."""
    max_batch_tokens: int = 4096
    """Most padded tokens (sequences x longest) in one runtime batch."""
    max_batch_attention_bytes: int = 64 << 20
    """Most bytes of float32 attention one runtime batch may produce."""
    max_queue_delay: float = 0.0
    """Seconds a lone sequence may wait for company when the runtime is idle."""
    max_queue_tokens: int = 65536
    """Most tokens waiting in the queue; beyond it new work is refused."""


@dataclass(eq=False)
class Job:
    """One sequence of one call, waiting for its result."""

    plan: Plan
    index: int
    length: int
    future: asyncio.Future[Any]
    deadline: float | None  # time.monotonic()
    finish: Callable[[Any], Any] | None
    enqueued: float = field(default_factory=time.monotonic)
    into: Into | None = None
    cancelled: bool = False
    trace: Any = None  # the call's trace (TraceHooks.caller) when traced


class BatchSpan(Protocol):
    def end(self, error: BaseException | None) -> None:
        """The batch's results were delivered, or it failed (any thread; once counts)."""


class TraceHooks(Protocol):
    """What the runtime reports to tracing (attention_server.tracing.Tracing)."""

    def caller(self) -> Any:
        """The current call's trace (event loop, at submit), kept on its jobs; None if untraced."""

    def batch_started(self, model: str, batch: Sequence[Job], tokens: int, padded_tokens: int) -> BatchSpan | None:
        """A runtime batch starts (event loop): its jobs carry their `trace` and `enqueued`."""

    def span(self, name: str, attributes: Any = None) -> contextlib.AbstractContextManager[Any]:
        """A child span of the current call around one of its steps (the engine's plan)."""


class Batcher:
    def __init__(self, model: LoadedModel, config: BatchConfig, observer: BatchObserver | None = None,
                 trace: TraceHooks | None = None) -> None:
        self.model = model
        self.observer = observer or BatchObserver()
        self.trace = trace
        self.config = config
        self.stats = BatcherStats()
        self._queue: list[Job] = []
        self._queued_tokens = 0
        self._instances = model.runtime.instances
        self._compute = ThreadPoolExecutor(max_workers=self._instances, thread_name_prefix=f"onnx-{model.name}")
        self._post = ThreadPoolExecutor(max_workers=self._instances, thread_name_prefix=f"post-{model.name}")
        self._narrow_running = 0
        self._wide_running = False
        self._runs: set[asyncio.Future[dict[str, np.ndarray]]] = set()  # batches computing now
        self._wakeup = asyncio.Event()
        self._accepting = True  # new calls
        self._closed = False  # any work
        self._calls = 0  # calls that may still submit sequences (see enter/leave)
        self._task: asyncio.Task[None] | None = None
        cells = model.metadata.num_layers * model.metadata.num_heads * 4
        self._attention_bytes_per_cell = cells

    # -- API used by the engine ---------------------------------------------------------

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def submit(self, plan: Plan, indices: list[int], timeout: float | None,
               finish: Callable[[Any], Any] | None = None, into: Into | None = None) -> list[Job]:
        """Queue sequences of one call; raises Unavailable when shutting down and
        ResourceExhausted when the queue has no room. `into`: see Into."""
        if self._closed:
            raise Unavailable("server is shutting down; retry on another instance")
        tokens = sum(len(plan.tokens[i]) for i in indices)
        limit = self.config.max_queue_tokens
        if self._queued_tokens + tokens > limit:
            self.stats.refused()
            if tokens > limit:  # no retry can help: a size limit
                raise TooLarge(f"request has {tokens} tokens, more than the whole queue holds "
                               f"(max_queue_tokens={limit}); split it or use AnalyzeStream with fewer sequences")
            raise ResourceExhausted(f"queue full: {self._queued_tokens} tokens waiting + {tokens} requested exceed "
                                    f"max_queue_tokens={limit}; retry with backoff")
        self._ensure_running()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        caller = self.trace.caller() if self.trace is not None else None
        jobs = [Job(plan, i, len(plan.tokens[i]), loop.create_future(), deadline, finish, trace=caller, into=into)
                for i in indices]
        self._queue.extend(jobs)
        self._queued_tokens += tokens
        self._wakeup.set()
        return jobs

    def discard(self, jobs: list[Job]) -> None:
        """The call is over (done, failed or cancelled): drop its sequences that are
        still queued, and let post-processing skip the ones in flight."""
        for job in jobs:
            job.cancelled = True
        ids = {id(j) for j in jobs}
        if not any(id(j) in ids for j in self._queue):
            return
        kept = []
        for job in self._queue:
            if id(job) in ids:
                self._queued_tokens -= job.length
            else:
                kept.append(job)
        self.stats.left_queue(cancelled=len(self._queue) - len(kept))
        self._queue = kept
        self._wakeup.set()

    def enter(self) -> None:
        """A call starts: it may submit sequences until it leaves, even while the
        batcher drains (a stream submits its sequences as its caller reads)."""
        if not self._accepting:
            raise Unavailable("server is shutting down; retry on another instance")
        self._calls += 1

    def leave(self) -> None:
        self._calls -= 1

    def stop_accepting(self) -> None:
        """Refuse new calls; the calls under way still submit and finish, and what
        is queued no longer waits for company (max_queue_delay)."""
        self._accepting = False
        self._wakeup.set()

    async def drain_and_close(self, poll: float = 0.05) -> None:
        """Refuse new calls, let the calls under way and their batches finish, then
        close (a model being unloaded or replaced)."""
        self.stop_accepting()
        while self._calls or self._queue or self._narrow_running or self._wide_running:
            await asyncio.sleep(poll)
        await self.close()

    async def close(self) -> None:
        """Fail what is still queued, let the batches already computing deliver
        their results, then stop the threads. The event loop keeps running
        meanwhile: the threads are joined from a helper thread."""
        self.stop_accepting()
        self._closed = True
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(Unavailable("server stopped before this sequence was computed"))
        self._queue.clear()
        self._queued_tokens = 0
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # No batch starts any more. Each running one hands its results to the
        # post-processing pool when it ends (`_ran`), so that pool closes after them.
        if self._runs:
            await asyncio.wait(set(self._runs))
        await asyncio.to_thread(self._join_threads)

    def _join_threads(self) -> None:
        self._compute.shutdown(wait=True)
        self._post.shutdown(wait=True)

    # -- the loop -----------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.name}")

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batcher %s: unexpected error", self.model.name)

    def _slot_free(self) -> bool:
        return not self._wide_running and self._narrow_running < self._instances

    async def _step(self) -> None:
        """Form one batch and start it on a free compute slot.

        A lone batch on an idle runtime runs on the wide session (every core, the
        lowest latency); under load, batches run side by side on single-threaded
        instances, one per core, which keeps throughput when other processes
        take CPU (a preempted thread then stalls only its own run).
        """
        loop = asyncio.get_running_loop()
        while not (self._queue and self._slot_free()):
            self._wakeup.clear()
            await self._wakeup.wait()
        idle = self._narrow_running == 0
        if idle and self.config.max_queue_delay > 0:
            await self._wait_for_company()
        self._expire()
        if not self._queue:
            return
        wide = self._instances == 1 or (idle and len(self._queue) == 1)
        # Under load, spread what is queued over the idle instances.
        share = len(self._queue) if wide or not idle else -(-len(self._queue) // self._instances)
        batch = self._take(max_count=share)
        now = time.monotonic()
        for job in batch:
            self.stats.queue.add(int((now - job.enqueued) * 1e9))
            self.observer.queued(self.model.name, now - job.enqueued)
        if wide:
            self._wide_running = True
        else:
            self._narrow_running += 1
        small = sum(j.length * j.length for j in batch) * self._attention_bytes_per_cell <= INLINE_POST_BYTES
        span = None
        if self.trace is not None:
            tokens = sum(j.length for j in batch)
            span = self.trace.batch_started(self.model.name, batch, tokens, len(batch) * max(j.length for j in batch))
        run = loop.run_in_executor(self._compute, self._run_model, batch, small, wide, loop, span)
        self._runs.add(run)
        run.add_done_callback(functools.partial(self._ran, batch, small, wide, loop, span))

    async def _wait_for_company(self) -> None:
        """On an idle runtime, let the oldest sequence wait up to max_queue_delay for
        others to share its batch; stop waiting once the batch is full, the queue
        is empty, or the batcher stops accepting calls (no company will come)."""
        while self._queue and self._accepting and not self._full():
            wait = self._queue[0].enqueued + self.config.max_queue_delay - time.monotonic()
            if wait <= 0:
                return
            self._wakeup.clear()  # set by submit, discard, stop_accepting and a run's end
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait)

    def _ran(self, batch: list[Job], small: bool, wide: bool, loop: asyncio.AbstractEventLoop,
             span: BatchSpan | None, run: asyncio.Future[dict[str, np.ndarray]]) -> None:
        """A run ended (event loop thread): free its slot, hand the batch on."""
        self._runs.discard(run)
        if wide:
            self._wide_running = False
        else:
            self._narrow_running -= 1
        self._wakeup.set()
        if run.cancelled():
            if span is not None:
                span.end(None)
            return
        exc = run.exception()
        if exc is not None:
            log.error("model %s failed on a batch of %d", self.model.name, len(batch), exc_info=exc)
            if span is not None:
                span.end(exc)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
        elif not small:  # small batches were cut and delivered by the compute thread
            self._post.submit(self._cut_batch, batch, run.result(), loop, span)

    def _full(self) -> bool:
        return len(self._queue) >= self.config.max_batch_size or self._queued_tokens >= self.config.max_batch_tokens

    def _expire(self) -> None:
        now = time.monotonic()
        kept = []
        for job in self._queue:
            if job.deadline is not None and now >= job.deadline:
                self._queued_tokens -= job.length
                if not job.future.done():
                    job.future.set_exception(DeadlineExceeded(
                        f"deadline passed after {1000 * (now - job.enqueued):.0f} ms in the queue; not computed"))
            else:
                kept.append(job)
        self.stats.left_queue(expired=len(self._queue) - len(kept))
        self._queue = kept

    def _fits(self, count: int, longest: int, real: int, max_count: int | None = None) -> bool:
        c = self.config
        padded = count * longest
        return (
            count <= min(c.max_batch_size, max_count or c.max_batch_size)
            and (padded <= c.max_batch_tokens or count == 1)
            and (count * longest * longest * self._attention_bytes_per_cell <= c.max_batch_attention_bytes
                 or count == 1)
            and padded <= real * (1 + PADDING_WASTE) + PADDING_ALLOWANCE
        )

    def _take(self, max_count: int | None = None) -> list[Job]:
        """The oldest job plus the queued jobs closest to it in length, while the
        batch stays within the limits; removed from the queue."""
        order = sorted(range(len(self._queue)), key=lambda i: self._queue[i].length)
        lengths = [self._queue[i].length for i in order]
        pos = order.index(0)  # the oldest job always goes
        lo = hi = pos
        real = lengths[pos]
        while True:
            grown = False
            # try the neighbour whose length is closer to the oldest job's first
            options = []
            if lo > 0:
                options.append((abs(lengths[lo - 1] - lengths[pos]), "lo"))
            if hi < len(order) - 1:
                options.append((abs(lengths[hi + 1] - lengths[pos]), "hi"))
            for _, side in sorted(options):
                new_lo, new_hi = (lo - 1, hi) if side == "lo" else (lo, hi + 1)
                added = lengths[new_lo] if side == "lo" else lengths[new_hi]
                if self._fits(new_hi - new_lo + 1, lengths[new_hi], real + added, max_count):
                    lo, hi, real, grown = new_lo, new_hi, real + added, True
                    break
            if not grown:
                break
        chosen = set(order[lo:hi + 1])
        batch = [self._queue[i] for i in sorted(chosen)]
        self._queue = [job for i, job in enumerate(self._queue) if i not in chosen]
        self._queued_tokens -= real
        return batch

    # -- worker threads -------------------------------------------------------------------

    def _run_model(self, batch: list[Job], cut_here: bool, wide: bool,
                   loop: asyncio.AbstractEventLoop, span: BatchSpan | None = None) -> dict[str, np.ndarray]:
        """Pad and run one batch (compute thread); small batches are also cut here,
        where a hop to the post-processing thread would cost more than the cut."""
        outputs: set[str] = set()
        for job in batch:
            outputs |= outputs_for(job.plan)
        started = time.perf_counter_ns()
        tokens = [job.plan.tokens[job.index] for job in batch]
        feed = pad_batch(tokens, self.model.metadata.pad_token_id)
        padded = time.perf_counter_ns()
        self.stats.started(len(batch), sum(len(t) for t in tokens), int(feed["input_ids"].size), wide)
        names = sorted(outputs)
        dests = batch[0].into(batch[0].index) if len(batch) == 1 and batch[0].into is not None else None
        if not outputs:
            values: dict[str, np.ndarray] = {}
        elif dests is not None and set(dests) == outputs:
            values = self.model.runtime.run(feed, names, wide=wide, into=dests)
        else:
            values = self.model.runtime.run(feed, names, wide=wide)
        ran = time.perf_counter_ns()
        per_size = self.stats.batch(len(batch))
        for duration, ns in ((self.stats.compute_input, padded - started), (per_size.compute_input, padded - started),
                             (self.stats.compute_infer, ran - padded), (per_size.compute_infer, ran - padded)):
            duration.add(ns)
        self.stats.ran()
        self.observer.ran(self.model.name, len(batch), sum(len(t) for t in tokens), (padded - started) / 1e9,
                          (ran - padded) / 1e9)
        if cut_here:
            self._cut_batch(batch, values, loop, span)
        return values

    def _cut_batch(self, batch: list[Job], values: dict[str, np.ndarray], loop: asyncio.AbstractEventLoop,
                   span: BatchSpan | None = None) -> None:
        started = time.perf_counter_ns()
        try:
            self._deliver(batch, values, loop)
        finally:
            ns = time.perf_counter_ns() - started
            self.stats.compute_output.add(ns)
            self.stats.batch(len(batch)).compute_output.add(ns)
            self.observer.delivered(self.model.name, ns / 1e9)
            if span is not None:
                span.end(None)

    def _deliver(self, batch: list[Job], values: dict[str, np.ndarray], loop: asyncio.AbstractEventLoop) -> None:
        for row, job in enumerate(batch):
            if job.cancelled:
                continue
            try:
                result: Any = cut(job.plan, job.index, row, values)
                if job.finish is not None:
                    result = job.finish(result)
            except Exception as exc:  # noqa: BLE001 - delivered to the caller
                loop.call_soon_threadsafe(_settle, job.future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, job.future, result, None)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
