"""The dynamic batcher's policy and lifecycle against a fake runtime: which
sequences share a runtime batch, what leaves the queue without computing, how
the queue refuses work, and how the batcher closes. No model, no ONNX Runtime:
the fake holds its runs until the test lets them go, so every scenario is set
up while the runtime is busy and does not depend on timing or on the number of
cores."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from attention_server.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from attention_server.runtime.batcher import BatchConfig, Batcher, Job
from attention_server.runtime.types import AnalyzeOptions, Plan, SequenceInput, Tokens

# The fake model's attention is 6 layers x 12 heads x 4 bytes per (from, to) cell, as MiniLM's.
LAYERS, HEADS = 6, 12
CELL_BYTES = LAYERS * HEADS * 4
NO_LIMITS = {"max_batch_tokens": 1 << 30, "max_batch_attention_bytes": 1 << 40}


@dataclass
class Run:
    lengths: list[int]
    wide: bool


class FakeRuntime:
    """What Batcher uses of `model.runtime`: `instances` and `run()`. A run records
    the real lengths of its rows and returns zeros; while the test holds the
    runtime, runs wait."""

    def __init__(self, instances: int = 1) -> None:
        self.instances = instances
        self.runs: list[Run] = []
        self.running = 0
        self.most_at_once = 0
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def run(self, feed: dict[str, np.ndarray], outputs: list[str], wide: bool = True) -> dict[str, np.ndarray]:
        with self._lock:
            self.runs.append(Run(feed["attention_mask"].sum(axis=1).tolist(), wide))
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            if not self._open.wait(60):
                raise RuntimeError("the test never released the runtime")
            rows, longest = feed["input_ids"].shape
            return {name: np.zeros((rows, longest, 1), np.float32) for name in outputs}
        finally:
            with self._lock:
                self.running -= 1

    def batches(self, skip: int = 0) -> list[list[int]]:
        """Lengths of each run's rows, in the order the runs started."""
        return [r.lengths for r in self.runs[skip:]]


@dataclass
class FakeModel:
    runtime: FakeRuntime
    name: str = "fake"
    metadata: Any = field(default_factory=lambda: SimpleNamespace(num_layers=LAYERS, num_heads=HEADS,
                                                                  pad_token_id=0))


def _tokens(n: int) -> Tokens:
    return Tokens(ids=np.arange(1, n + 1, dtype=np.int64), type_ids=np.zeros(n, np.int64), texts=["t"] * n,
                  starts=np.full(n, -1, np.int32), ends=np.full(n, -1, np.int32),
                  word_index=np.arange(n, dtype=np.int32), special=np.zeros(n, bool), segment=np.zeros(n, np.int32))


def plan(model: FakeModel, *lengths: int) -> Plan:
    """A request of sequences with these token counts, asking for hidden states only."""
    return Plan(model=model, inputs=[SequenceInput(id=str(i)) for i in range(len(lengths))],  # type: ignore[arg-type]
                tokens=[_tokens(n) for n in lengths], options=AnalyzeOptions(attention=False, hidden_states=True),
                layers=[], heads=[])


async def eventually(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Let the event loop run until `predicate()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.002)


class Harness:
    def __init__(self, instances: int = 1, **config: Any) -> None:
        self.runtime = FakeRuntime(instances)
        self.model = FakeModel(self.runtime)
        self.batcher = Batcher(self.model, BatchConfig(**config))  # type: ignore[arg-type]

    def submit(self, *lengths: int, timeout: float | None = None) -> list[Job]:
        """One call per length, queued in this order (oldest first)."""
        return [self.batcher.submit(plan(self.model, n), [0], timeout)[0] for n in lengths]

    async def plug(self) -> Job:
        """Hold the runtime and occupy it with one run, so what is submitted next
        waits in the queue until `release()`."""
        self.runtime.hold()
        [job] = self.submit(1)
        await eventually(lambda: self.runtime.running == 1)
        return job

    async def release_and_wait(self, jobs: list[Job]) -> list[Any]:
        self.runtime.release()
        return await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs), return_exceptions=True), 30)


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(instances: int = 1, **config: Any) -> Harness:
        made.append(Harness(instances, **config))
        return made[-1]

    yield factory
    for harness in made:
        harness.runtime.release()
        await harness.batcher.close()


# -- which sequences share a runtime batch ---------------------------------------------

async def test_oldest_first_then_the_nearest_lengths(make):
    h = make(**NO_LIMITS)
    plug = await h.plug()
    jobs = h.submit(10, 300, 12, 9, 290, 11, 50)
    await h.release_and_wait([plug, *jobs])
    # The oldest (10) takes its nearest neighbours while padding stays within the waste bound;
    # then the oldest left (300) with 290; 50 pads too much with either group and runs alone.
    # Rows keep the order the calls came in.
    assert h.runtime.batches(skip=1) == [[10, 12, 9, 11], [300, 290], [50]]
    assert h.batcher.queue_depth == 0 and h.batcher.queued_tokens == 0


async def test_padding_waste_is_bounded(make):
    h = make(**NO_LIMITS)
    plug = await h.plug()
    # 2 x 230 = 460 padded <= 1.2 x (100 + 230) + 64 = 460; 2 x 231 = 462 > 461.2
    jobs = h.submit(100, 230)
    await h.release_and_wait([plug, *jobs])
    plug = await h.plug()
    jobs = h.submit(100, 231)
    await h.release_and_wait([plug, *jobs])
    assert h.runtime.batches() == [[1], [100, 230], [1], [100], [231]]


async def test_padded_tokens_are_bounded_and_a_longer_lone_sequence_still_runs(make):
    h = make(max_batch_tokens=100)
    plug = await h.plug()
    jobs = h.submit(30, 30, 30, 30, 150)
    results = await h.release_and_wait([plug, *jobs])
    assert h.runtime.batches(skip=1) == [[30, 30, 30], [30], [150]]
    assert [len(r.tokens) for r in results[1:]] == [30, 30, 30, 30, 150]


async def test_attention_memory_is_bounded(make):
    h = make(max_batch_tokens=1 << 30, max_batch_attention_bytes=3 * 20 * 20 * CELL_BYTES)
    plug = await h.plug()
    jobs = h.submit(20, 20, 20, 20, 200)
    await h.release_and_wait([plug, *jobs])
    assert h.runtime.batches(skip=1) == [[20, 20, 20], [20], [200]]


async def test_sequences_per_batch_are_bounded(make):
    h = make(max_batch_size=2)
    plug = await h.plug()
    jobs = h.submit(8, 8, 8, 8, 8)
    await h.release_and_wait([plug, *jobs])
    assert h.runtime.batches(skip=1) == [[8, 8], [8, 8], [8]]


async def test_each_sequence_gets_its_own_row(make):
    h = make()
    plug = await h.plug()
    jobs = [h.batcher.submit(plan(h.model, 5, 7, 6), [0, 1, 2], None), h.batcher.submit(plan(h.model, 4), [0], None)]
    results = await h.release_and_wait([plug, *jobs[0], *jobs[1]])
    assert [(r.index, len(r.tokens), r.hidden_states.shape) for r in results[1:]] == [
        (0, 5, (5, 1)), (1, 7, (7, 1)), (2, 6, (6, 1)), (0, 4, (4, 1))]
    assert h.batcher.stats.sequences == 5 and h.batcher.stats.tokens == 1 + 5 + 7 + 6 + 4


@pytest.mark.parametrize("instances", [1, 2, 4, 8, 16])
async def test_runs_never_exceed_the_instances_and_a_lone_batch_runs_wide(make, instances):
    h = make(instances, max_batch_size=2)
    [alone] = h.submit(9)
    await asyncio.wait_for(alone.future, 10)
    assert h.runtime.runs == [Run([9], wide=True)]  # idle runtime, one batch: every core
    h.runtime.hold()
    jobs = h.submit(*[9] * 40)
    await eventually(lambda: h.runtime.running == instances)
    under_load = h.runtime.runs[1:]
    await h.release_and_wait(jobs)
    assert h.runtime.most_at_once == instances
    assert h.batcher.stats.sequences == 41
    # Under load, batches run side by side on the single-threaded instances (one instance: always wide).
    assert len(under_load) == instances and all(run.wide == (instances == 1) for run in under_load)


# -- what leaves the queue without computing ------------------------------------------

async def test_expired_sequences_leave_before_compute(make):
    h = make()
    plug = await h.plug()
    [late] = h.submit(5, timeout=0.01)
    [in_time] = h.submit(6, timeout=60)
    await eventually(lambda: time.monotonic() > late.deadline)
    results = await h.release_and_wait([plug, late, in_time])
    assert isinstance(results[1], DeadlineExceeded) and "in the queue; not computed" in str(results[1])
    assert len(results[2].tokens) == 6
    assert h.runtime.batches() == [[1], [6]]
    assert h.batcher.stats.expired == 1 and h.batcher.stats.sequences == 2


async def test_discarded_calls_leave_the_queue(make):
    h = make()
    plug = await h.plug()
    gone, kept = h.submit(40), h.submit(7)
    assert (h.batcher.queue_depth, h.batcher.queued_tokens) == (2, 47)
    h.batcher.discard(gone)
    assert (h.batcher.queue_depth, h.batcher.queued_tokens) == (1, 7)
    await h.release_and_wait([plug, *kept])
    assert h.runtime.batches() == [[1], [7]]
    assert h.batcher.stats.cancelled == 1 and not gone[0].future.done()


async def test_full_queue_refuses_at_once_and_keeps_what_it_holds(make):
    h = make(max_queue_tokens=100)
    plug = await h.plug()
    held = h.submit(40, 40)
    with pytest.raises(ResourceExhausted, match=r"queue full: 80 tokens waiting \+ 30 requested exceed "
                                                r"max_queue_tokens=100; retry with backoff"):
        h.submit(30)
    assert (h.batcher.queue_depth, h.batcher.queued_tokens) == (2, 80)
    held += h.submit(20)  # exactly full is fine
    with pytest.raises(ResourceExhausted, match=r"request has 101 tokens, more than the whole queue holds"):
        h.batcher.submit(plan(h.model, 50, 51), [0, 1], None)
    results = await h.release_and_wait([plug, *held])
    assert [len(r.tokens) for r in results] == [1, 40, 40, 20]
    assert h.batcher.stats.rejected == 2


# -- waiting for company (max_queue_delay) ----------------------------------------------

async def test_a_lone_sequence_waits_for_company_until_the_batch_is_full(make):
    h = make(max_queue_delay=60.0, max_batch_size=3)
    first = h.submit(5)
    await asyncio.sleep(0.05)
    assert h.runtime.runs == [] and h.batcher.queue_depth == 1  # waiting for company
    rest = h.submit(5, 5)  # the batch is full: no reason to wait any longer
    await asyncio.wait_for(asyncio.gather(*(j.future for j in first + rest)), 10)
    assert h.runtime.batches() == [[5, 5, 5]]


async def test_stop_accepting_ends_the_wait_for_company(make):
    h = make(max_queue_delay=60.0)
    [job] = h.submit(5)
    await asyncio.sleep(0.05)
    assert h.runtime.runs == []
    h.batcher.stop_accepting()  # draining: no new call will come to share the batch
    await asyncio.wait_for(job.future, 10)
    assert h.runtime.batches() == [[5]]


# -- lifecycle -----------------------------------------------------------------------

async def test_drain_lets_registered_calls_finish_then_closes(make):
    h = make()
    h.batcher.enter()
    plug = await h.plug()
    draining = asyncio.ensure_future(h.batcher.drain_and_close(poll=0.005))
    await asyncio.sleep(0)  # the drain starts
    with pytest.raises(Unavailable):
        h.batcher.enter()  # new calls are refused...
    later = h.submit(3)  # ...while a call under way still submits (a stream, as its caller reads)
    h.runtime.release()
    assert [len(r.tokens) for r in await asyncio.gather(plug.future, later[0].future)] == [1, 3]
    assert not draining.done()
    h.batcher.leave()
    await asyncio.wait_for(draining, 10)
    with pytest.raises(Unavailable, match="shutting down"):
        h.submit(1)


async def test_close_fails_what_is_queued(make):
    h = make()
    plug = await h.plug()
    queued = h.submit(4, 5)
    closing = asyncio.ensure_future(h.batcher.close())
    await eventually(lambda: all(j.future.done() for j in queued))
    for job in queued:
        with pytest.raises(Unavailable, match="stopped before this sequence was computed"):
            job.future.result()
    h.runtime.release()
    await asyncio.wait_for(closing, 10)
    assert len((await plug.future).tokens) == 1  # the batch already running still delivers
    assert h.runtime.batches() == [[1]]


async def test_close_does_not_block_the_event_loop(make):
    h = make()
    plug = await h.plug()
    # Were close() to block the loop while the run goes on, only this timer would end the run.
    rescue = threading.Timer(3.0, h.runtime.release)
    rescue.start()
    try:
        closing = asyncio.ensure_future(h.batcher.close())
        await asyncio.sleep(0.05)
        assert h.runtime.running == 1, "the event loop was blocked until the run ended"
        assert not closing.done()  # close waits for the running batch, without blocking the loop
        h.runtime.release()
        await asyncio.wait_for(closing, 10)
    finally:
        rescue.cancel()
    assert plug.future.done()


async def test_a_large_result_finishing_during_close_is_delivered(make):
    h = make()
    h.runtime.hold()
    # 200 x 200 cells x 72 heads x 4 bytes > 4 MiB: cut and delivered on the post-processing thread
    [large] = h.submit(200)
    await eventually(lambda: h.runtime.running == 1)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    rescue = threading.Timer(3.0, h.runtime.release)
    rescue.start()
    try:
        closing = asyncio.ensure_future(h.batcher.close())
        await asyncio.sleep(0.05)
        h.runtime.release()
        await asyncio.wait_for(closing, 10)
        result = await asyncio.wait_for(large.future, 5)
    finally:
        rescue.cancel()
        loop.set_exception_handler(previous)
    assert len(result.tokens) == 200
    assert not errors, [e.get("exception") or e.get("message") for e in errors]


# -- counters --------------------------------------------------------------------------

async def test_counters_add_up_under_concurrent_batches(make):
    """Compute threads update the counters side by side: none may lose an update.
    (Unlocked, `stats.tokens += sum(...)` lost updates here in every run.)"""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        h = make(16, max_batch_size=1)
        lengths = [1 + i % 7 for i in range(3000)]
        jobs = h.submit(*lengths)
        await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 120)
    finally:
        sys.setswitchinterval(previous)
    stats = h.batcher.stats
    assert (stats.batches, stats.sequences, stats.tokens, stats.padded_tokens) == (
        len(lengths), len(lengths), sum(lengths), sum(lengths))
    assert stats.compute_infer.count == len(lengths) and sum(stats.batch_sizes) == len(lengths)
