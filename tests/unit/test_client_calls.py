"""The typed SDK against a fake service (no model): one sequence in, one result out; a
batch in, a list out; streams in order; the asyncio client the same."""

import inspect

import numpy as np
import pytest

from attention_client import AnalyzeResult, AsyncAttentionClient, AttentionClient, InvalidArgumentError
from attention_client._proto.attention.v1 import attention_pb2 as pb
from tests.unit.fake_service import HEADS, LAYERS, FakeService


@pytest.fixture(scope="module")
def fake():
    with FakeService() as service:
        yield service


@pytest.fixture
def client(fake):
    fake.requests.clear()
    with AttentionClient(fake.target, timeout=10) as c:
        yield c


def test_one_sequence_one_result(client, fake):
    result = client.analyze("hello world", top_k=2, layers=[1], heads=[0, 2])
    assert isinstance(result, AnalyzeResult)
    assert result.token_texts == ["[CLS]", "hello", "world", "[SEP]"]
    assert result.attention.shape == (1, 2, 4, 4) and result.hidden_states.shape == (4, 4)
    assert [(hp.layer, hp.head) for hp in result.pairs] == [(1, 0), (1, 2)]
    [request] = fake.requests
    assert len(request.sequences) == 1 and request.options.top_k == 2


def test_a_text_pair_is_explicit_and_token_ids_are_one_sequence(client, fake):
    paired = client.analyze("where is it", text_pair="here")
    assert paired.token_texts[-2:] == ["here", "[SEP]"]
    ids = client.analyze([101, 7592, 102], attention=False)
    assert len(ids.tokens) == 3 and ids.attention is None
    assert fake.requests[0].sequences[0].text_pair == "here"
    assert list(fake.requests[1].sequences[0].token_ids.ids) == [101, 7592, 102]


def test_a_batch_is_a_list_in_order_with_labels(client, fake):
    results = client.analyze_batch(["one", "two words", np.array([5, 6, 7, 8])], ids=["a", "b", "c"],
                                   text_pairs=["x", None, None], attention_dtype="float16")
    assert [r.id for r in results] == ["a", "b", "c"] and [r.index for r in results] == [0, 1, 2]
    assert [len(r.tokens) for r in results] == [5, 4, 4]
    assert all(r.attention.dtype == np.float16 and r.attention.shape[:2] == (LAYERS, HEADS) for r in results)
    assert fake.requests[0].options.attention_dtype == pb.DATA_TYPE_FLOAT16


def test_a_stream_yields_in_order_and_checks_arguments_at_once(client):
    stream = client.analyze_stream(["a", "b c", "d e f"], top_k=1)
    assert [len(r.tokens) for r in stream] == [3, 4, 5]
    with pytest.raises(InvalidArgumentError, match=r"options\.top_k"):
        client.analyze_stream(["a"], top_k=0)  # raised here, not on the first next()


def test_leaving_a_stream_early_cancels_it(client):
    stream = client.analyze_stream([f"text {k}" for k in range(4)])
    first = next(stream)
    stream.close()
    assert first.index == 0
    assert client.analyze("still fine").tokens


def test_a_list_of_texts_is_not_one_sequence(client, fake):
    with pytest.raises(InvalidArgumentError, match="analyze_batch"):
        client.analyze(["one", "two"])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="text_pair="):
        client.analyze(("question", "answer"))  # type: ignore[arg-type]
    assert fake.requests == []


def test_models(client):
    [info] = client.list_models()
    assert info == client.get_model() and info.max_batch_size == 4 and len(info.heads) == LAYERS * HEADS


async def test_async_client_has_the_same_methods(fake):
    sync_names = {n for n in dir(AttentionClient) if not n.startswith("_")}
    async_names = {n for n in dir(AsyncAttentionClient) if not n.startswith("_")}
    assert sync_names - {"__enter__", "__exit__"} == async_names - {"__aenter__", "__aexit__"}
    for name in ("analyze", "analyze_batch", "analyze_stream", "list_models", "get_model"):
        assert inspect.signature(getattr(AttentionClient, name)).parameters.keys() == \
            inspect.signature(getattr(AsyncAttentionClient, name)).parameters.keys(), name
    async with AsyncAttentionClient(fake.target, timeout=10) as client:
        one = await client.analyze("hello world", top_k=1)
        many = await client.analyze_batch(["a", "b c"], ids=["x", "y"])
        streamed = [r async for r in client.analyze_stream(["a", "b c"])]
        info = await client.get_model()
        with pytest.raises(InvalidArgumentError, match=r"options\.layers"):
            client.analyze_stream(["a"], layers=0)  # type: ignore[arg-type]
    assert one.attention.flags.writeable and len(one.pairs) == LAYERS * HEADS
    assert [r.id for r in many] == ["x", "y"] and [len(r.tokens) for r in streamed] == [3, 4]
    assert info.name == "fake"
