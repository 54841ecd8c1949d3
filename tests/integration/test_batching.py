"""Dynamic batching: concurrent calls share runtime batches and still get their
own numbers; the queue is bounded; expired and cancelled work never runs."""

import asyncio
import time

import grpc
import numpy as np
import pytest

from attention_client import AsyncAttentionClient, AttentionError
from attention_server.errors import DeadlineExceeded, ResourceExhausted
from attention_server.grpc_api.server import build_engine
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
    engine = build_engine(Settings(model_repository=REPOSITORY))
    yield engine
    await engine.close()


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


async def test_concurrent_calls_get_the_numbers_they_get_alone(server):
    async with AsyncAttentionClient(server.target, timeout=120) as client:
        alone = [await client.analyze(seqs, **opts) for seqs, opts in REQUESTS]
        stats = server.server.engine.batcher(server.server.engine.repository.get("")).stats
        before_batches, before_sequences = stats.batches, stats.sequences
        rounds = 4
        calls = [client.analyze(seqs, **opts) for _ in range(rounds) for seqs, opts in REQUESTS]
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


async def test_runtime_batches_group_by_length_within_the_limits(engine):
    lengths_words = [3, 200, 5, 4, 190, 6]
    plans = [engine.plan("", [SequenceInput(text=_text(n, n))], AnalyzeOptions()) for n in lengths_words]
    batcher = engine.batcher(plans[0].model)
    jobs = [batcher.submit(p, [0], None)[0] for p in plans]  # nothing runs until we await
    first = batcher._take()
    second = batcher._take()
    assert {j.length for j in first} == {j.length for j in jobs if j.length < 20}
    assert {j.length for j in second} == {j.length for j in jobs if j.length > 100}
    assert batcher.queued_tokens == 0
    for job in jobs:
        job.future.cancel()


async def test_full_queue_refuses_at_once_and_keeps_what_it_holds(engine):
    small = build_engine(Settings(model_repository=REPOSITORY, max_queue_tokens=600))
    try:
        plan = small.plan("", [SequenceInput(text=_text(250, 1))], AnalyzeOptions(top_k=1))
        batcher = small.batcher(plan.model)
        held = batcher.submit(plan, [0], None) + batcher.submit(plan, [0], None)  # 2 x 252 tokens
        started = time.perf_counter()
        with pytest.raises(ResourceExhausted, match="queue full: 504 tokens waiting \\+ 252 requested exceed "
                                                    "max_queue_tokens=600"):
            batcher.submit(plan, [0], None)
        assert time.perf_counter() - started < 0.1
        results = await asyncio.gather(*(j.future for j in held))
        assert [len(r.tokens) for r in results] == [252, 252]
        with pytest.raises(ResourceExhausted, match="more than the whole queue holds"):
            batcher.submit(small.plan("", [SequenceInput(text=_text(250, 1))] * 3, AnalyzeOptions()), [0, 1, 2], None)
        assert batcher.stats.rejected == 2
    finally:
        await small.close()


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
    heavy = engine.plan("", [SequenceInput(text=_text(400, 2))] * 3, AnalyzeOptions())
    light = engine.plan("", [SequenceInput(text="never mind")], AnalyzeOptions())
    batcher = engine.batcher(heavy.model)
    busy = asyncio.ensure_future(engine.analyze(heavy))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(engine.analyze(light))
    await asyncio.sleep(0.01)
    assert batcher.queue_depth >= 1
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert len(await busy) == 3
    await asyncio.sleep(0.05)
    assert batcher.stats.cancelled == 1
    assert batcher.stats.sequences == 3  # only the heavy call ran


def test_grpc_deadline_and_cancel_never_compute():
    with ServerThread(max_batch_tokens=512) as srv:
        stats = srv.server.engine.batcher(srv.server.engine.repository.get("")).stats

        async def scenario():
            async with AsyncAttentionClient(srv.target, timeout=120) as client:
                heavy = asyncio.ensure_future(client.analyze([_text(400, 3)] * 4, top_k=1, attention=False))
                await asyncio.sleep(0.05)  # the heavy call is computing, four batches of one
                with pytest.raises(AttentionError) as err:
                    await client.analyze("late", timeout=0.05)
                assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                cancelled = asyncio.ensure_future(client.analyze("cancel me"))
                await asyncio.sleep(0.05)
                cancelled.cancel()
                assert len(await heavy) == 4
                await asyncio.sleep(0.1)

        asyncio.run(scenario())
        assert stats.sequences == 4, "only the heavy call's sequences may reach the runtime"
        assert stats.expired + stats.cancelled == 2


def test_flood_gets_resource_exhausted_and_the_rest_is_served():
    with ServerThread(max_queue_tokens=1200, max_batch_tokens=512) as srv:
        async def flood():
            async with AsyncAttentionClient(srv.target, timeout=120) as client:
                calls = [client.analyze(_text(300, i), top_k=1, attention=False, hidden_states=False)
                         for i in range(16)]
                return await asyncio.gather(*calls, return_exceptions=True)

        outcomes = asyncio.run(flood())
        refused = [o for o in outcomes if isinstance(o, AttentionError)]
        served = [o for o in outcomes if not isinstance(o, BaseException)]
        assert refused and served and len(refused) + len(served) == 16
        assert all(o.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in o.details for o in refused)
        assert all(len(r.pairs) == 72 for r in served)
