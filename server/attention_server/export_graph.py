"""Graph rewrites for attention-export: fusions that keep the attention probabilities,
and the int8 variant with the figures that say how far its attention moves.

Build-time tooling like export.py (onnx, ONNX Runtime's transformers and
quantization tools); the server never imports this module.

- `optimize`: ONNX Runtime's transformer optimizer with BERT fusions (GELU with its
  bias, LayerNorm, SkipLayerNorm with its bias) but never the fused Attention or
  MultiHeadAttention kernels: they return the context only, not the softmax
  probabilities this service exists to hand out. ONNX Runtime's own session
  optimizations (MatMul+Transpose/scale into FusedMatMul, SkipLayerNorm) still run
  when the server loads the graph.
- `quantize`: dynamic int8 quantization of the MatMuls with constant weights, per
  output channel, except the feed-forward output MatMuls (their input is GELU
  output with large outliers: quantizing them too took the top-5 agreement below
  on the probe corpus from 95.3% to 93.2%).
- `agreement`: a candidate graph against a reference graph over sentences: max
  abs differences and the share of each head's top-5 pairs that agree
  (`probe_corpora`: the probe corpus at two sequence lengths).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("attention_server.export")

# Fused attention kernels of ONNX Runtime: none of them outputs the probabilities.
ATTENTION_KERNELS = frozenset({
    "Attention", "MultiHeadAttention", "PackedAttention", "PackedMultiHeadAttention", "GroupQueryAttention",
    "SparseAttention", "QAttention", "QOrderedAttention", "DecoderAttention", "DecoderMaskedMultiHeadAttention",
    "DecoderMaskedSelfAttention", "LongformerAttention", "RelativePositionBiasAttention",
})
OPTIMIZER = "onnxruntime.transformers.optimizer (bert; fused attention off)"


def optimizer_name(model_type: str) -> str:
    """What model.json's graph.optimizer says for the optimizer's `model_type`."""
    return OPTIMIZER.replace("(bert;", f"({model_type};")
TOP_K = 5


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's python tools log every fusion at INFO on loggers of their own."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


def op_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def check_probabilities_kept(model: Any, num_layers: int) -> None:
    """Raise unless the graph still computes one Softmax per layer and no fused attention kernel."""
    counts = op_counts(model)
    fused = sorted(set(counts) & ATTENTION_KERNELS)
    if fused:
        raise SystemExit(f"export failed: the graph holds fused attention kernels {fused}, which drop the "
                         "attention probabilities")
    if counts.get("Softmax", 0) != num_layers:
        raise SystemExit(f"export failed: {counts.get('Softmax', 0)} Softmax nodes for {num_layers} layers")


def optimize(path: Path, num_layers: int, num_heads: int, hidden_size: int,
             model_type: str = "bert") -> dict[str, int]:
    """Rewrite the graph at `path` in place with the transformer fusions of the optimizer's
    `model_type` that keep the probabilities; returns the fused operators and their counts."""
    import onnx
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    options.enable_attention = False  # Attention/MultiHeadAttention drop the probabilities
    options.use_multi_head_attention = False
    options.enable_embed_layer_norm = False  # its mask output exists for the fused Attention only
    options.enable_gelu_approximation = False  # FastGelu (tanh) is not the model's erf GELU
    before = onnx.load(str(path))
    outputs = [o.name for o in before.graph.output]
    with _quiet():
        model = optimizer.optimize_model(str(path), model_type=model_type, num_heads=num_heads,
                                         hidden_size=hidden_size, optimization_options=options, opt_level=0,
                                         use_gpu=False)
        fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
        model.save_model_to_file(str(path))
    after = onnx.load(str(path))
    if [o.name for o in after.graph.output] != outputs:
        raise SystemExit(f"export failed: the optimizer changed the outputs {outputs} to "
                         f"{[o.name for o in after.graph.output]}")
    check_probabilities_kept(after, num_layers)
    log.info("graph optimized: %d -> %d nodes; fused %s", len(before.graph.node), len(after.graph.node), fused)
    return fused


def keys_into_matmul(path: Path, keys: list[str]) -> int:
    """Rewrite MatMul(query, Transpose(key, [0, 1, 3, 2])) as FusedMatMul(query, key, transB=1)
    for each key tensor in `keys` (graph outputs): ONNX Runtime would otherwise merge that
    Transpose with the one that made `key` and transpose the key a second time, to keep the
    output. Returns the number of MatMuls rewritten."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    wanted = set(keys)
    rewritten = 0
    for transpose in list(model.graph.node):
        perm = [list(a.ints) for a in transpose.attribute if a.name == "perm"]
        users = consumers.get(transpose.output[0], [])
        if (transpose.op_type != "Transpose" or transpose.input[0] not in wanted or perm != [[0, 1, 3, 2]]
                or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != transpose.output[0]):
            continue
        matmul = users[0]
        fused = helper.make_node("FusedMatMul", [matmul.input[0], transpose.input[0]], list(matmul.output),
                                 name=f"{matmul.name}_transB", domain="com.microsoft", transB=1, alpha=1.0)
        index = list(model.graph.node).index(matmul)
        model.graph.node.remove(matmul)
        model.graph.node.insert(index, fused)
        model.graph.node.remove(transpose)
        rewritten += 1
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(path))
    return rewritten


def _producers(model: Any) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output}


def feed_forward_outputs(model: Any) -> list[str]:
    """Names of the MatMuls with a constant weight whose input is a GELU's output."""
    constants = {i.name for i in model.graph.initializer}
    producers = _producers(model)
    gelus = {"Gelu", "BiasGelu", "FastGelu"}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants
            and n.input[0] in producers and producers[n.input[0]].op_type in gelus]


def quantize(source: Path, target: Path, num_layers: int) -> dict[str, Any]:
    """Write the int8 variant of the graph at `source` to `target`; returns the recipe."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    keep_float = feed_forward_outputs(model)
    if len(keep_float) != num_layers:
        raise SystemExit(f"int8 export failed: found {len(keep_float)} feed-forward output MatMuls after GELU, "
                         f"expected {num_layers} (export the optimized graph first)")
    with _quiet():
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=keep_float,
                         extra_options={"MatMulConstBOnly": True})
    quantized = onnx.load(str(target))
    check_probabilities_kept(quantized, num_layers)
    counts = op_counts(quantized)
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weights": "int8, per output channel", "activations": "uint8, per tensor, at run time",
        "quantized_matmuls": counts.get("MatMulInteger", 0),
        "float_matmuls": counts.get("MatMul", 0),
        "kept_float": "feed-forward output MatMuls (after GELU) and the attention MatMuls (no constant weight)",
    }


def agreement(reference: Any, candidate: Any, feeds: list[dict[str, np.ndarray]],
              top_k: int = TOP_K) -> dict[str, Any]:
    """Run both ONNX Runtime sessions on each single-sequence feed (no padding) and compare.

    top-k agreement: for every sequence and head, the share of the reference's top-k
    (from, to) pairs that are also in the candidate's top-k; `top5_agreement` pools
    every head of every sequence, `top5_agreement_per_head` pools each head over the
    sequences (layers x heads)."""
    worst_attention = worst_hidden = 0.0
    agree = None
    for feed in feeds:
        ref_hidden, ref_attention = reference.run(["last_hidden_state", "attentions"], feed)
        hidden, attention = candidate.run(["last_hidden_state", "attentions"], feed)
        worst_attention = max(worst_attention, float(np.abs(attention - ref_attention).max()))
        worst_hidden = max(worst_hidden, float(np.abs(hidden - ref_hidden).max()))
        layers, heads = ref_attention.shape[1:3]
        flat_ref = ref_attention[0].reshape(layers, heads, -1)
        flat = attention[0].reshape(layers, heads, -1)
        k = min(top_k, flat.shape[-1])
        top_ref = np.sort(np.argpartition(-flat_ref, k - 1, axis=-1)[..., :k], axis=-1)
        top = np.argpartition(-flat, k - 1, axis=-1)[..., :k]
        same = (top_ref[..., :, None] == top[..., None, :]).any(axis=-1).sum(axis=-1) / k
        agree = same if agree is None else agree + same
    assert agree is not None, "no sequences"
    per_head = agree / len(feeds)
    return {
        "sequences": len(feeds),
        "max_abs_diff_attention": worst_attention,
        "max_abs_diff_hidden": worst_hidden,
        f"top{top_k}_agreement": float(per_head.mean()),
        f"top{top_k}_agreement_min_head": float(per_head.min()),
        f"heads_with_top{top_k}_agreement_at_least_95": int((per_head >= 0.95).sum()),
        f"top{top_k}_agreement_per_head": [[round(float(x), 4) for x in row] for row in per_head],
    }


def probe_corpora(sentences: list[str]) -> dict[str, list[str]]:
    """The probe corpus as sequences of two lengths: each sentence alone (14 tokens on
    average), and four consecutive sentences as one text (51 tokens): attention
    spreads over more tokens as sequences grow, and top-5 pairs get easier to reorder."""
    return {"probe_sentences": sentences,
            "probe_sentences_4_at_a_time": [" ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4)]}


def single_feeds(tokenizer: Any, sentences: list[str], with_token_types: bool) -> list[dict[str, np.ndarray]]:
    """One unpadded feed per sentence (tokenizers.Tokenizer, special tokens added)."""
    feeds = []
    for enc in tokenizer.encode_batch(sentences):
        ids = np.array([enc.ids], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if with_token_types:
            feed["token_type_ids"] = np.array([enc.type_ids], dtype=np.int64)
        feeds.append(feed)
    return feeds
