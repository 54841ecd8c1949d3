"""AnalyzeResult.to_bertviz(): bertviz's arguments from a result, checked on synthetic
results (a causal one among them) and fed to the real bertviz 1.4.1."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest
import torch

from attention_client import AnalyzeResult, InvalidArgumentError
from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client.tensors import to_tensor

TOKENS = ["<|endoftext|>", "The", "Ġcat", "Ġsat", "."]


def _result(attention: np.ndarray, layers: list[int] | None = None, heads: list[int] | None = None,
            segments: list[int] | None = None, tokens: list[str] = TOKENS) -> AnalyzeResult:
    n_layers, n_heads = attention.shape[:2]
    msg = pb.SequenceResult(layers=layers if layers is not None else range(n_layers),
                            heads=heads if heads is not None else range(n_heads))
    for k, text in enumerate(tokens):
        msg.tokens.add(id=k, text=text, segment=segments[k] if segments else 0)
    to_tensor(attention, msg.attention)
    return AnalyzeResult.from_pb(msg)


def _causal(layers: int = 2, heads: int = 4, n: int = len(TOKENS), seed: int = 0) -> np.ndarray:
    """Random causal attention: rows sum to 1, zero above the diagonal."""
    scores = np.random.default_rng(seed).random((layers, heads, n, n)) * np.tril(np.ones((n, n)))
    return (scores / scores.sum(-1, keepdims=True)).astype(np.float32)


def bertviz_params(html: Any) -> dict[str, Any]:
    """The data bertviz embeds in its page (`const params = {...}; // HACK...`)."""
    found = re.search(r"const params = (\{.*?\}); // HACK", html.data, re.S)
    assert found, "bertviz's page layout changed: no params"
    params: dict[str, Any] = json.loads(found.group(1))
    return params


def test_torch_tensors_per_layer_as_bertviz_takes_them():
    attention = _causal()
    result = _result(attention)
    got = result.to_bertviz()
    assert got.tokens == TOKENS and got.sentence_b_start is None
    assert len(got.attention) == 2
    for layer, tensor in enumerate(got.attention):
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
        assert tuple(tensor.shape) == (1, 4, 5, 5)
        assert np.array_equal(tensor.numpy()[0], attention[layer])
        assert np.shares_memory(tensor.numpy(), result.attention)  # views, no copy
    attention_, tokens, start = got  # a plain 3-tuple: head_view(*got)
    assert attention_ is got.attention and tokens is got.tokens and start is None


def test_numpy_and_float16():
    attention = _causal()
    got = _result(attention.astype(np.float16)).to_bertviz(framework="numpy")
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (1, 4, 5, 5)
               for a in got.attention)
    np.testing.assert_array_equal(np.concatenate(got.attention), attention.astype(np.float16).astype(np.float32))


def test_sentence_b_start_is_the_first_token_of_segment_1():
    tokens = ["[CLS]", "where", "?", "[SEP]", "here", ".", "[SEP]"]
    result = _result(_causal(n=7), segments=[0, 0, 0, 0, 1, 1, 1], tokens=tokens)
    assert result.to_bertviz().sentence_b_start == 4
    roberta = ["<s>", "where", "</s>", "</s>", "here", "</s>"]  # no token types: the closing </s> says 0
    assert _result(_causal(n=6), segments=[0, 0, 0, 0, 1, 0], tokens=roberta).to_bertviz().sentence_b_start == 4


@pytest.mark.parametrize(("layers", "heads", "message"), [
    ([0, 2], None, r"layers: this result has layers \[0, 2\]; bertviz numbers layers by position"),
    ([1, 2], None, r"layers: this result has layers \[1, 2\]"),
    (None, [0, 1, 2, 5], r"heads: this result has heads \[0, 1, 2, 5\]"),
])
def test_a_subset_that_bertviz_would_misnumber_is_refused(layers, heads, message):
    with pytest.raises(InvalidArgumentError, match=message):
        _result(_causal(), layers=layers, heads=heads).to_bertviz()


def test_leading_layers_and_heads_are_numbered_right_and_accepted():
    got = _result(_causal(layers=1, heads=2), layers=[0], heads=[0, 1]).to_bertviz()
    assert len(got.attention) == 1 and tuple(got.attention[0].shape) == (1, 2, 5, 5)


def test_no_attention_and_an_unknown_framework():
    msg = pb.SequenceResult(layers=[0], heads=[0])
    with pytest.raises(InvalidArgumentError, match="attention: not in this result"):
        AnalyzeResult.from_pb(msg).to_bertviz()
    with pytest.raises(InvalidArgumentError, match="framework: 'jax'"):
        _result(_causal()).to_bertviz(framework="jax")  # type: ignore[call-overload]


def test_real_bertviz_draws_the_causal_numbers():
    import bertviz

    attention = _causal()
    result = _result(attention)
    for view in (bertviz.head_view, bertviz.model_view):
        [shown] = bertviz_params(view(*result.to_bertviz(), html_action="return"))["attention"]
        assert np.array_equal(np.asarray(shown["attn"], dtype=np.float32), attention)  # exact: float32 -> JSON
        assert shown["left_text"] == shown["right_text"] == ["<|endoftext|>", "The", " cat", " sat", "."]
        assert not np.triu(np.asarray(shown["attn"]), 1).any()
