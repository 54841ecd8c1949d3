"""Dynamic batching with the real model: concurrent calls share runtime batches
and still get their own numbers; the queue is bounded; expired and cancelled work
never runs. Each test pins what its scenario depends on (compute slots, batch
limits, or max_queue_delay to hold work in the queue) and waits for conditions,
so it holds for any ATTENTION_INSTANCES. The batching policy itself is tested
against a fake runtime in tests/unit/test_batching_policy.py."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from attention_client import AsyncAttentionClient, AttentionError
from attention_server.errors import DeadlineExceeded
from attention_server.grpc_api.server import build_engine
from attention_server.runtime.batcher import Batcher
from attention_server.runtime.types import AnalyzeOptions, SequenceInput
from attention_server.settings import Settings
from tests.helpers import REPOSITORY, ServerThread

WORDS = "attention heads learn syntax semantics position and broadcast patterns across layers".split()


def _text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


REQUESTS = [
    # (sequences, options): different lengths and options, batched together
    ([_text(5, 1)], {"top_k": 3}),
    ([_text(60, 2), _text(3, 3)], {}),
    ([_text(20, 4)], {"layers": [4, 0], "heads": [11, 2], "attention_dtype": "float16"}),
    ([_text(8, 5), _text(9, 6), _text(7, 7)], {"attention": False, "top_k": 2, "exclude_special_tokens": True}),
    ([_text(120, 8)], {"hidden_states": False, "layers": [5]}),
    ([_text(12, 9)], {"attention": False, "hidden_states": True}),
    ([_text(30, 10), _text(31, 11)], {"top_k": 1, "min_strength": 0.3, "heads": [0]}),
]


@pytest.fixture
async def engine():
    """An engine with one compute slot: a batch waits while another computes, on any machine."""
    engine = build_engine(Settings(model_repository=REPOSITORY, instances=1, max_batch_tokens=256))
    yield engine
    await engine.close()


async def eventually(predicate: Callable[[], object], timeout: float = 60.0) -> None:
    """Let the event loop run until `predicate()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


def _same(alone, batched, dtype_tol):
    assert alone.tokens == batched.tokens and alone.layers == batched.layers and alone.heads == batched.heads
    for name in ("attention", "hidden_states"):
        a, b = getattr(alone, name), getattr(batched, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), atol=dtype_tol, rtol=0)
    for pa, pb_ in zip(alone.pairs, batched.pairs, strict=True):
        assert (pa.layer, pa.head) == (pb_.layer, pb_.head)
        np.testing.assert_allclose([p.strength for p in pa.pairs], [p.strength for p in pb_.pairs], atol=1e-5)


def _batcher(srv: ServerThread) -> Batcher:
    return srv.server.engine.batcher(srv.server.engine.repository.get(""))


async def test_concurrent_calls_get_the_numbers_they_get_alone():
    # A lone sequence on an idle server waits up to 250 ms for company: the concurrent calls
    # meet in the queue however fast the machine. The instances are left as configured
    # (ATTENTION_INSTANCES): the numbers must not depend on them.
    with ServerThread(max_queue_delay_ms=250) as srv:
        async with AsyncAttentionClient(srv.target, timeout=120) as client:
            alone = [await client.analyze_batch(seqs, **opts) for seqs, opts in REQUESTS]
            stats = _batcher(srv).stats
            before_batches, before_sequences = stats.batches, stats.sequences
            rounds = 4
            calls = [client.analyze_batch(seqs, **opts) for _ in range(rounds) for seqs, opts in REQUESTS]
            batched = await asyncio.gather(*calls)
    n_sequences = rounds * sum(len(seqs) for seqs, _ in REQUESTS)
    assert stats.sequences - before_sequences == n_sequences
    # calls really shared runtime batches
    assert stats.batches - before_batches < n_sequences
    for k, results in enumerate(batched):
        expected = alone[k % len(REQUESTS)]
        for a, b in zip(expected, results, strict=True):
            # float32 accumulation order can change with the batch's padded length: 1e-5, not bitwise
            _same(a, b, dtype_tol=1e-5 if a.attention is None or a.attention.dtype == np.float32 else 1e-3)


async def test_expired_sequences_never_reach_the_runtime(engine):
    plan = engine.plan("", [SequenceInput(text="too late")], AnalyzeOptions())
    batcher = engine.batcher(plan.model)
    computed = batcher.stats.sequences
    [job] = batcher.submit(plan, [0], timeout=0.0)
    with pytest.raises(DeadlineExceeded, match="not computed"):
        await job.future
    assert batcher.stats.expired == 1 and batcher.stats.sequences == computed
    ok = await engine.analyze(engine.plan("", [SequenceInput(text="in time")], AnalyzeOptions()), timeout=30)
    assert len(ok[0].tokens) == 4 and batcher.stats.sequences == computed + 1


async def test_cancelled_calls_leave_the_queue(engine):
    # One compute slot, one 202-token sequence per batch (max_batch_tokens=256): the light call's
    # sequence waits behind the heavy call's until their last batch has started.
    heavy = engine.plan("", [SequenceInput(text=_text(200, 2))] * 6, AnalyzeOptions())
    light = engine.plan("", [SequenceInput(text="never mind")], AnalyzeOptions())
    batcher = engine.batcher(heavy.model)
    stats = batcher.stats
    busy = asyncio.ensure_future(engine.analyze(heavy))
    await eventually(lambda: stats.batches >= 1)  # the heavy call is computing
    gone = asyncio.ensure_future(engine.analyze(light))
    await eventually(lambda: stats.sequences + batcher.queue_depth == 7)  # the light sequence is queued
    assert stats.batches < 6, "heavy sequences are still queued ahead of the light one"
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert stats.cancelled == 1
    assert len(await busy) == 6
    assert stats.sequences == 6 and batcher.queue_depth == 0  # only the heavy call ran


CLIENT = """
import sys
from attention_client import AttentionClient, AttentionError
with AttentionClient(sys.argv[1]) as client:
    try:
        client.analyze("late", timeout=float(sys.argv[2]))
        print("OK")
    except AttentionError as exc:
        print(exc.code.name)
"""


def _state(pid: int) -> str:
    """A process's state letter from /proc (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def test_grpc_deadline_is_enforced_by_the_server_and_cancel_drops_queued_work():
    # A lone sequence on an idle server waits up to a minute for company (max_queue_delay), unless a
    # batch fills up (64 tokens): the calls below stay queued, whatever the machine and its cores.
    with ServerThread(max_queue_delay_ms=60_000, max_batch_tokens=64) as srv:
        batcher = _batcher(srv)
        stats = batcher.stats
        # The deadline: the caller is frozen (SIGSTOP) while its call is queued, so only the
        # server can act when the 3 s pass; it drops the sequence without computing it.
        caller = subprocess.Popen([sys.executable, "-c", CLIENT, srv.target, "3"], stdout=subprocess.PIPE,
                                  text=True)
        try:
            await eventually(lambda: batcher.queue_depth == 1)
            os.kill(caller.pid, signal.SIGSTOP)
            await eventually(lambda: batcher.queue_depth == 0, timeout=30)
            assert _state(caller.pid) == "T", "the caller was stopped all along"
            assert stats.expired + stats.cancelled == 1 and stats.sequences == 0
        finally:
            os.kill(caller.pid, signal.SIGCONT)
            out, _ = caller.communicate(timeout=60)
        assert out.strip() == "DEADLINE_EXCEEDED"
        # Cancel: a call the caller gives up while it is queued leaves the queue, never computed.
        async with AsyncAttentionClient(srv.target, timeout=120) as client:
            call = asyncio.ensure_future(client.analyze("cancel me"))
            await eventually(lambda: batcher.queue_depth == 1)
            call.cancel()
            await eventually(lambda: batcher.queue_depth == 0 and stats.expired + stats.cancelled == 2)
            assert stats.sequences == 0
            # A call that fills a batch runs at once: the server computes, it only dropped those two.
            full = await client.analyze(_text(70, 5), top_k=1, attention=False)
        assert len(full.tokens) > 64 and stats.sequences == 1 and stats.batches == 1


async def test_a_full_queue_refuses_calls_with_resource_exhausted_and_serves_the_rest():
    # Held for company until 4 sequences are queued (max_batch_size), in a queue of 1200 tokens;
    # the 4 then fit one runtime batch, so none is left to wait for company again.
    with ServerThread(max_queue_tokens=1200, max_batch_size=4, max_batch_attention_mib=128,
                      max_queue_delay_ms=60_000) as srv:
        batcher = _batcher(srv)
        async with AsyncAttentionClient(srv.target, timeout=120) as client:
            def call(words, seed):
                return asyncio.ensure_future(client.analyze(_text(words, seed), top_k=1, attention=False,
                                                            hidden_states=False))

            held = [call(300, i) for i in range(3)]  # 3 x 302 tokens wait for a fourth sequence
            await eventually(lambda: batcher.queue_depth == 3)
            flood = await asyncio.gather(*(call(300, i) for i in range(3, 16)), return_exceptions=True)
            assert all(isinstance(o, AttentionError) and o.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                       and "queue full: 906 tokens waiting + 302 requested" in o.details for o in flood), flood
            assert batcher.stats.rejected == 13 and batcher.queue_depth == 3
            served = await asyncio.gather(*held, call(288, 99))  # 290 tokens still fit: the batch is full, it runs
    assert [len(r.pairs) for r in served] == [72] * 4
    assert batcher.stats.batches <= 4 and batcher.stats.sequences == 4
