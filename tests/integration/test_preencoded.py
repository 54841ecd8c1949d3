"""Responses of full matrices only are laid out before the run and written by ONNX
Runtime in place: the same bytes as the ordinary encoding, without its copy."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from attention_client import AttentionClient
from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_server.services import converters
from bench.workloads import text_of_length
from tests.helpers import ServerThread


def _analyze(server: ServerThread, request: pb.AnalyzeRequest) -> bytes:
    assert server.server is not None
    service = server.server.attention
    raw, lease = asyncio.run_coroutine_threadsafe(service.analyze(request, 60.0), server.loop).result(120)
    server.loop.call_soon_threadsafe(lease.release)
    return raw


@pytest.mark.parametrize("options", [
    pb.AnalyzeOptions(),
    pb.AnalyzeOptions(hidden_states=False, attention_dtype=pb.DATA_TYPE_FLOAT16),
])
def test_laid_out_response_equals_the_ordinary_encoding(server: ServerThread, monkeypatch: pytest.MonkeyPatch,
                                                        options: pb.AnalyzeOptions) -> None:
    request = pb.AnalyzeRequest(sequences=[pb.Sequence(text=text_of_length(200, 3), id="x")], options=options)
    encoded: list[int] = []
    original = converters.result_parts
    monkeypatch.setattr(converters, "result_parts", lambda out: encoded.append(1) or original(out))
    laid_out = _analyze(server, request)
    assert not encoded  # written in place: never encoded from the arrays
    monkeypatch.setattr(converters, "preencodable", lambda plan, index: False)
    ordinary = _analyze(server, request)
    assert encoded and laid_out == ordinary


def test_streamed_and_batched_results_hold_the_same_numbers(server: ServerThread, client: AttentionClient) -> None:
    texts = [text_of_length(n, n) for n in (200, 150)]
    alone = [client.analyze(t) for t in texts]
    streamed = list(client.analyze_stream(texts))
    batched = client.analyze_batch(texts)
    for a, s, b in zip(alone, streamed, batched, strict=True):
        for name in ("attention", "hidden_states"):
            np.testing.assert_array_equal(getattr(a, name), getattr(s, name))
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert a.token_texts == s.token_texts == b.token_texts
