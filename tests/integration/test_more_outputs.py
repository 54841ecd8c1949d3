"""`hidden_states_layers` and `query_key`: the numbers (ONNX Runtime in this process, eager
PyTorch for the hidden states, and queries x keys giving back the attention), nothing fetched
when they are not asked for, both protocols of attention.v1, an old export's clear error, and
the size limits holding against a hostile caller before anything is computed."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from attention_client import AttentionClient, InvalidArgumentError, ResourceExhaustedError
from attention_server.runtime.engine import Engine, Limits
from attention_server.runtime.repository import ModelRepository
from attention_server.runtime.results import outputs_for
from attention_server.runtime.types import AnalyzeOptions, SequenceInput
from tests.helpers import MODEL_DIR, ServerThread
from tests.integration.several_models import OLD, build_repository, model_json, run_onnx
from tests.tiny_models import source_of

MiB = 1 << 20
DEFAULT = MODEL_DIR.name


@pytest.fixture(scope="module")
def repository(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tiny_repository, tmp_path_factory.mktemp("outputs") / "repository")


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerThread]:
    # The smallest response limit the settings allow, so that a hostile call is refused without heavy inputs.
    with ServerThread(model_repository=repository, metrics_port=-1, max_response_bytes=MiB) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[AttentionClient]:
    with AttentionClient(server.target, timeout=60) as c:
        yield c


def _ids(repository: Path, name: str, lengths: tuple[int, ...], seed: int = 3) -> list[list[int]]:
    vocab = int(model_json(repository, name)["vocab_size"])  # type: ignore[call-overload]
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_per_layer_outputs_equal_onnx_runtime(client: AttentionClient, repository: Path, name: str) -> None:
    meta = model_json(repository, name)
    hidden_names, query_names, key_names = (meta[k] for k in ("hidden_states_outputs", "query_outputs",
                                                                "key_outputs"))
    assert isinstance(hidden_names, list) and isinstance(query_names, list) and isinstance(key_names, list)
    layers, heads, asked = [1], [3, 0], [2, 0, 1]
    batch = _ids(repository, name, (9, 4))
    results = client.analyze_batch(batch, model=name, hidden_states_layers=asked, query_key=True, layers=layers,
                                   heads=heads, attention=False)
    for ids, result in zip(batch, results, strict=True):
        wanted = sorted({*(hidden_names[k] for k in asked), query_names[1], key_names[1]})
        expected = run_onnx(repository, name, ids, wanted)
        assert result.hidden_states_layers == asked and result.layer_hidden_states is not None
        assert result.layer_hidden_states.shape == (3, len(ids), 32)
        for k, layer in enumerate(asked):
            np.testing.assert_allclose(result.hidden_states_by_layer[layer], expected[hidden_names[layer]][0],
                                       atol=1e-4)
            np.testing.assert_array_equal(result.hidden_states_by_layer[layer], result.layer_hidden_states[k])
        assert result.queries is not None and result.keys is not None and result.queries.shape == (1, 2, len(ids), 8)
        np.testing.assert_allclose(result.queries[0], expected[query_names[1]][0, heads], atol=1e-4)
        np.testing.assert_allclose(result.keys[0], expected[key_names[1]][0, heads], atol=1e-4)
        assert result.attention is None  # only what was asked


def test_hidden_states_layers_are_huggingfaces_output_hidden_states(client: AttentionClient, repository: Path,
                                                                    tiny_repository: Path) -> None:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(source_of(tiny_repository, "gpt2"), attn_implementation="eager").eval()
    ids = _ids(repository, "tiny-gpt2", (12,))[0]
    with torch.no_grad():
        eager = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    result = client.analyze(ids, model="tiny-gpt2", hidden_states_layers=[0, 1, 2], attention=False)
    assert len(eager) == 3  # embeddings, layer 1, layer 2 after GPT-2's final layer norm
    for layer in range(3):
        np.testing.assert_allclose(result.hidden_states_by_layer[layer], eager[layer][0].numpy(), atol=1e-4)
    assert result.hidden_states is not None
    np.testing.assert_array_equal(result.hidden_states_by_layer[2], result.hidden_states)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
def test_queries_and_keys_give_back_the_attention(client: AttentionClient, name: str) -> None:
    """softmax(scaling q.k + mask) is the served attention: for GPT-2's learned positions, Llama's
    rotary keys expanded to the query heads (grouped-query attention), and an encoder."""
    info = client.get_model(name)
    result = client.analyze("The cat sat on the mat, and the dog sat too.", model=name, query_key=True)
    assert result.queries is not None and result.keys is not None and result.attention is not None
    scaling = np.asarray(info.query_key_scaling)[:, None, None, None]
    logits = scaling * result.queries.astype(np.float64) @ np.swapaxes(result.keys, -1, -2)
    n = logits.shape[-1]
    if info.causal:
        logits = np.where(np.tril(np.ones((n, n), dtype=bool)), logits, -np.inf)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    np.testing.assert_allclose(probabilities, result.attention, atol=1e-5)


def test_nothing_more_is_fetched_unless_asked(repository: Path) -> None:
    """The default path asks ONNX Runtime for the same outputs as before these options existed."""
    models = ModelRepository.load(repository, ["tiny-llama"], "tiny-llama")
    engine = Engine(models, Limits())
    seq = [SequenceInput(text="the cat sat")]
    assert outputs_for(engine.plan("", seq, AnalyzeOptions())) == {"last_hidden_state", "attentions"}
    assert outputs_for(engine.plan("", seq, AnalyzeOptions(attention_dtype="float16", hidden_states=False))) \
        == {"attentions_fp16"}
    asked = engine.plan("", seq, AnalyzeOptions(layers=[1], hidden_states_layers=[0], query_key=True,
                                                attention=False, hidden_states=False))
    assert outputs_for(asked) == {"hidden_states_0", "query_1", "key_1"}
    plain = engine.plan("", seq, AnalyzeOptions(layers=[1]))
    n = len(asked.tokens[0])
    assert asked.query_key_bytes(0) >= 2 * 1 * 4 * n * 8 * 4  # both [1, 4, n, 8] float32, counted up front
    assert asked.hidden_states_layers_bytes(0) >= n * 32 * 4
    assert plain.query_key_bytes(0) == plain.hidden_states_layers_bytes(0) == 0


def test_an_old_export_names_the_option_and_the_fix(client: AttentionClient, server: ServerThread) -> None:
    with pytest.raises(InvalidArgumentError, match=r"options\.query_key: model 'tiny-bert-old' was exported "
                                                   r"without query/key outputs; re-export it"):
        client.analyze("hello", model=OLD, query_key=True)
    with pytest.raises(InvalidArgumentError, match=r"options\.hidden_states_layers: model 'tiny-bert-old' was "
                                                   r"exported without per-layer hidden states"):
        client.analyze("hello", model=OLD, hidden_states_layers=[0])
    reply = httpx.post(f"{server.http_url}/v1/analyze", timeout=30, json={
        "model": OLD, "sequences": [{"text": "hello"}], "options": {"queryKey": True}})
    assert reply.status_code == 400 and "options.query_key: model 'tiny-bert-old'" in reply.text
    assert client.analyze("hello", model=OLD).attention is not None  # the rest still served


def test_layers_out_of_range_are_named(client: AttentionClient) -> None:
    with pytest.raises(InvalidArgumentError, match=r"options\.hidden_states_layers\[1\]: layer 3 is out of range "
                                                   r"\[0, 3\) for model 'tiny-gpt2' "
                                                   r"\(0: embeddings \.\. 2: last layer\)"):
        client.analyze("hello", model="tiny-gpt2", hidden_states_layers=[0, 3])


def _stats(server: ServerThread, name: str) -> tuple[int, int]:
    stats = httpx.get(f"{server.http_url}/v2/models/{name}/stats", timeout=30).json()["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def test_hostile_sizes_are_refused_before_anything_runs(client: AttentionClient, server: ServerThread,
                                                        repository: Path) -> None:
    """64 sequences x 512 tokens asking for every layer's queries and keys: refused from the
    estimate, naming the option and the limit, on both transports; nothing reaches the model."""
    batch = _ids(repository, "tiny-gpt2", (512,) * 64)
    before = _stats(server, "tiny-gpt2")
    with pytest.raises(ResourceExhaustedError, match=r"response would be about 17\.3 MiB, over the 1 MiB limit "
                                                     r"\(max_response_bytes\); use AnalyzeStream, options\.query_key "
                                                     r"takes 16\.0 MiB of it"):
        client.analyze_batch(batch, model="tiny-gpt2", query_key=True, attention=False, hidden_states=False)
    # The remedy fits the option: heads do not change the size of hidden states.
    with pytest.raises(ResourceExhaustedError, match=r"options\.hidden_states_layers takes 12\.0 MiB of it "
                                                     r"\(list fewer layers or leave it out\)"):
        client.analyze_batch(batch, model="tiny-gpt2", hidden_states_layers=[0, 1, 2], attention=False,
                             hidden_states=False)
    reply = httpx.post(f"{server.http_url}/v1/analyze", timeout=60, json={
        "model": "tiny-gpt2", "sequences": [{"tokenIds": {"ids": ids}} for ids in batch],
        "options": {"queryKey": True, "attention": False, "hiddenStates": False}})
    assert reply.status_code == 413, reply.text  # JSON's base64 counts: 4/3 of the protobuf's bytes and more
    assert "over the 1 MiB limit (max_response_bytes)" in reply.text and "options.query_key takes" in reply.text
    assert _stats(server, "tiny-gpt2") == before


def test_a_streamed_result_too_large_for_its_queries_and_keys(client: AttentionClient, server: ServerThread,
                                                              repository: Path) -> None:
    if not client.get_model().supports_query_key:
        pytest.skip(f"{DEFAULT} was exported before query/key outputs existed (make model re-exports it)")
    ids = _ids(repository, DEFAULT, (512,))
    before = _stats(server, DEFAULT)
    with pytest.raises(ResourceExhaustedError, match=r"one result would be about 9\.0 MiB, over the 1 MiB limit "
                                                     r"\(max_response_bytes\); options\.query_key takes 9\.0 MiB"):
        next(iter(client.analyze_stream(ids, query_key=True, attention=False, hidden_states=False)))
    assert _stats(server, DEFAULT) == before


def test_http_v1_json_carries_them(client: AttentionClient, server: ServerThread) -> None:
    body = {"model": "tiny-llama", "sequences": [{"text": "the cat sat"}],
            "options": {"hiddenStatesLayers": [2, 0], "queryKey": True, "layers": [0], "attention": False}}
    reply = httpx.post(f"{server.http_url}/v1/analyze", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()["results"][0]
    expected = client.analyze("the cat sat", model="tiny-llama", hidden_states_layers=[2, 0], query_key=True,
                              layers=[0], attention=False)

    def array(tensor: dict[str, Any]) -> np.ndarray:
        assert tensor["dtype"] == "DATA_TYPE_FLOAT32"
        return np.frombuffer(base64.b64decode(tensor["data"]), "<f4").reshape([int(d) for d in tensor["shape"]])

    assert result["hiddenStatesLayers"] == [2, 0]
    np.testing.assert_array_equal(array(result["layerHiddenStates"]), expected.layer_hidden_states)
    np.testing.assert_array_equal(array(result["queries"]), expected.queries)
    np.testing.assert_array_equal(array(result["keys"]), expected.keys)


def test_the_asyncio_client_takes_the_same_options(client: AttentionClient, server: ServerThread) -> None:
    import asyncio

    from attention_client.aio import AsyncAttentionClient

    async def call() -> Any:
        async with AsyncAttentionClient(server.target, timeout=60) as aclient:
            return [r async for r in aclient.analyze_stream(["the cat", "sat on the mat"], model="tiny-llama",
                                                           hidden_states_layers=[1], query_key=True, heads=[2])]

    streamed = asyncio.run(call())
    expected = client.analyze_batch(["the cat", "sat on the mat"], model="tiny-llama", hidden_states_layers=[1],
                                    query_key=True, heads=[2])
    for got, want in zip(streamed, expected, strict=True):
        assert got.hidden_states_layers == [1] and got.heads == [2]
        np.testing.assert_array_equal(got.layer_hidden_states, want.layer_hidden_states)
        np.testing.assert_array_equal(got.queries, want.queries)
        np.testing.assert_array_equal(got.keys, want.keys)
