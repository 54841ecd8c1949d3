"""Every supported architecture, exported by the real attention-export from a tiny random
model (tests/tiny_models.py), serves the attention eager PyTorch computes; its extra graph
outputs (hidden states of every layer, query and key vectors) are what model.json says
they are. An unsupported architecture fails naming the supported ones."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from attention_client import AttentionClient
from tests.helpers import ServerThread
from tests.tiny_models import ARCHITECTURES, model_name, source_of

TOL = 1e-4
TEXTS = [
    "The quiet child repaired the broken fence.",
    "Why?",
    "In 1967, a careful driver ignored the strange noise; however, nobody noticed it at the market.",
]
EXPECTED = {  # causal, position embedding, key/value heads (of 4 query heads)
    "bert": (False, "absolute", 4),
    "roberta": (False, "absolute", 4),
    "distilbert": (False, "absolute", 4),
    "gpt2": (True, "absolute", 4),
    "llama": (True, "rotary", 2),
}


@pytest.fixture(scope="module")
def tiny_client(tiny_repository: Path) -> Iterator[AttentionClient]:
    """One real server over the tiny repository (all five models), and a client."""
    with ServerThread(model_repository=tiny_repository, default_model=model_name("bert"), metrics_port=-1,
                      http_port=-1) as srv, AttentionClient(srv.target, timeout=60) as client:
        yield client


def _metadata(repository: Path, arch: str) -> dict[str, Any]:
    return json.loads((repository / model_name(arch) / "model.json").read_text())


def _padded(repository: Path, arch: str) -> tuple[list[list[int]], dict[str, np.ndarray]]:
    """TEXTS tokenized by the exported tokenizer, and the batch right-padded as the server pads it."""
    from tokenizers import Tokenizer

    meta = _metadata(repository, arch)
    tokenizer = Tokenizer.from_file(str(repository / model_name(arch) / "tokenizer.json"))
    ids = [enc.ids for enc in tokenizer.encode_batch(TEXTS)]
    longest = max(len(i) for i in ids)
    feed = {"input_ids": np.full((len(ids), longest), meta["pad_token_id"], dtype=np.int64),
            "attention_mask": np.zeros((len(ids), longest), dtype=np.int64)}
    for row, seq in enumerate(ids):
        feed["input_ids"][row, :len(seq)] = seq
        feed["attention_mask"][row, :len(seq)] = 1
    if "token_type_ids" in meta["inputs"]:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    return ids, feed


@pytest.fixture(scope="module")
def eager(tiny_repository: Path) -> dict[str, Any]:
    """Per architecture: eager PyTorch's outputs (attentions, hidden states) on the padded batch."""
    import torch
    from transformers import AutoModel

    torch.set_grad_enabled(False)
    out = {}
    for arch in ARCHITECTURES:
        model = AutoModel.from_pretrained(source_of(tiny_repository, arch), attn_implementation="eager").eval()
        _, feed = _padded(tiny_repository, arch)
        result = model(**{k: torch.from_numpy(v) for k, v in feed.items()}, output_attentions=True,
                       output_hidden_states=True, return_dict=True)
        out[arch] = {"attentions": torch.stack(result.attentions, dim=1).numpy(),
                     "hidden_states": [h.numpy() for h in result.hidden_states],
                     "last_hidden_state": result.last_hidden_state.numpy()}
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_served_attention_equals_eager_pytorch(arch: str, tiny_client: AttentionClient, tiny_repository: Path,
                                               eager: dict[str, Any]) -> None:
    ids, _ = _padded(tiny_repository, arch)
    assert len({len(i) for i in ids}) == len(ids) > 1  # a padded batch of different lengths
    results = tiny_client.analyze_batch(ids, model=model_name(arch))
    info = tiny_client.get_model(model_name(arch))
    reference = eager[arch]
    for row, (seq, result) in enumerate(zip(ids, results, strict=True)):
        n = len(seq)
        assert [t.id for t in result.tokens] == seq
        assert result.attention.shape == (2, 4, n, n)
        np.testing.assert_allclose(result.attention, reference["attentions"][row, :, :, :n, :n], atol=TOL, rtol=0)
        np.testing.assert_allclose(result.hidden_states, reference["last_hidden_state"][row, :n], atol=TOL, rtol=0)
        np.testing.assert_allclose(result.attention.sum(axis=-1), 1.0, atol=1e-5)
        above = np.triu(result.attention, k=1)
        if EXPECTED[arch][0]:
            assert not above.any(), "a decoder attends to later tokens"
        else:
            assert above.max() > 0.01  # an encoder does, so the check above can fail
    assert (info.num_layers, info.num_heads) == (2, 4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_metadata_describes_the_attention(arch: str, tiny_repository: Path) -> None:
    meta = _metadata(tiny_repository, arch)
    causal, positions, kv_heads = EXPECTED[arch]
    assert (meta["causal"], meta["position_embedding"], meta["num_key_value_heads"]) == (causal, positions, kv_heads)
    assert meta["model_type"] == arch
    layers = meta["num_layers"]
    assert len(meta["hidden_states_outputs"]) == layers + 1
    assert len(meta["query_outputs"]) == len(meta["key_outputs"]) == layers
    assert set(meta["hidden_states_outputs"] + meta["query_outputs"] + meta["key_outputs"]) <= set(meta["outputs"])
    assert meta["verification"]["max_abs_diff_query_key"] <= TOL
    if causal:
        assert {"bos", "eos"} <= set(meta["special_tokens"])
        assert "token_type_ids" not in meta["inputs"]
    else:
        assert {"cls", "sep"} <= set(meta["special_tokens"])
    if arch in ("gpt2", "llama"):  # their tokenizers have no padding token: the exporter took eos
        assert meta["pad_token_id"] == meta["special_tokens"]["eos"]["id"]
    prefixes = (meta["continuing_subword_prefix"], meta.get("word_start_prefix"))
    assert prefixes == {"bert": ("##", None), "distilbert": ("##", None), "llama": (None, "▁")}.get(arch, (None, "Ġ"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_extra_outputs_are_the_hidden_states_and_the_query_key_vectors(arch: str, tiny_repository: Path,
                                                                      eager: dict[str, Any]) -> None:
    """In ONNX Runtime: every layer's hidden states equal eager PyTorch's output_hidden_states,
    and softmax(query . key^T * scale + mask) equals the layer's attention."""
    import onnxruntime as ort

    meta = _metadata(tiny_repository, arch)
    session = ort.InferenceSession(str(tiny_repository / model_name(arch) / meta["onnx_file"]),
                                   providers=["CPUExecutionProvider"])
    ids, feed = _padded(tiny_repository, arch)
    names = meta["hidden_states_outputs"] + meta["query_outputs"] + meta["key_outputs"] + ["attentions"]
    got = dict(zip(names, session.run(names, feed), strict=True))
    reference = eager[arch]
    layers, heads, kv_heads = meta["num_layers"], meta["num_heads"], meta["num_key_value_heads"]
    for row, seq in enumerate(ids):
        n = len(seq)
        for layer, name in enumerate(meta["hidden_states_outputs"]):
            np.testing.assert_allclose(got[name][row, :n], reference["hidden_states"][layer][row, :n], atol=TOL,
                                       rtol=0, err_msg=f"hidden states {layer}")
        for layer in range(layers):
            query = got[meta["query_outputs"][layer]][row, :, :n]
            key = got[meta["key_outputs"][layer]][row, :, :n]
            assert query.shape == key.shape == (heads, n, meta["head_dim"])
            logits = query @ key.transpose(0, 2, 1) * meta["query_key_scaling"][layer]
            if meta["causal"]:
                logits = np.where(np.tril(np.ones((n, n), dtype=bool)), logits, -np.inf)
            probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probabilities /= probabilities.sum(axis=-1, keepdims=True)
            np.testing.assert_allclose(probabilities, got["attentions"][row, layer, :, :n, :n], atol=TOL, rtol=0)
            # Grouped-query attention: query heads that share a key/value head get the same keys.
            groups = heads // kv_heads
            for h in range(heads):
                np.testing.assert_array_equal(key[h], key[h - h % groups])
            if groups > 1:
                assert not np.array_equal(key[0], key[groups])


@pytest.mark.parametrize("model_type", ["t5", "electra"])
def test_an_unsupported_architecture_fails_naming_the_supported_ones(model_type: str, tmp_path: Path) -> None:
    from transformers import AutoConfig

    source = tmp_path / model_type
    AutoConfig.for_model(model_type).save_pretrained(source)
    done = subprocess.run(
        [sys.executable, "-m", "attention_server.export", "--source", str(source), "--name", "unsupported",
         "--repository", str(tmp_path / "repository")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert f"model_type '{model_type}'" in done.stderr and "is not supported" in done.stderr
    for name in ("BERT", "RoBERTa", "DistilBERT", "GPT-2", "Llama"):
        assert name in done.stderr
    assert not (tmp_path / "repository" / "unsupported").exists()
