"""The architectures attention-export supports, and what model.json says about a model's
attention and tokenizer (causal or not, key/value heads, positions, special tokens,
padding, how subword pieces mark words).

Build-time tooling like export.py; the server never imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """One supported family: its HF model_type, and what export needs to know of it."""

    model_type: str
    label: str
    causal: bool
    position_embedding: str  # "absolute" | "rotary" | "relative"
    optimizer: str | None  # model type of onnxruntime.transformers.optimizer; None: none fits
    position_offset: int = 0  # position embeddings start after the padding index (RoBERTa)


SUPPORTED = {a.model_type: a for a in (
    Architecture("bert", "BERT", causal=False, position_embedding="absolute", optimizer="bert"),
    Architecture("roberta", "RoBERTa", causal=False, position_embedding="absolute", optimizer="bert",
                 position_offset=2),
    Architecture("distilbert", "DistilBERT", causal=False, position_embedding="absolute", optimizer="bert"),
    Architecture("gpt2", "GPT-2", causal=True, position_embedding="absolute", optimizer="gpt2"),
    # No optimizer model type matches a Llama block (RMSNorm, rotary, SwiGLU); exported as torch writes it.
    Architecture("llama", "Llama-style", causal=True, position_embedding="rotary", optimizer=None),
)}


def supported_list() -> str:
    return ", ".join(f"{a.label} ({a.model_type})" for a in SUPPORTED.values())


def architecture(source: Path) -> Architecture:
    """The supported architecture of the model folder `source`; SystemExit naming the supported ones otherwise."""
    config_file = source / "config.json"
    try:
        model_type = json.loads(config_file.read_text())["model_type"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"export failed: {config_file} has no model_type ({exc}); attention-export takes a "
                         "Hugging Face model folder (config.json, weights, tokenizer.json)") from exc
    if model_type not in SUPPORTED:
        raise SystemExit(f"export failed: model_type {model_type!r} ({source}) is not supported; attention-export "
                         f"supports {supported_list()}")
    return SUPPORTED[model_type]


def attention_facts(config: Any, arch: Architecture) -> dict[str, Any]:
    """model.json's causal, num_key_value_heads and position_embedding."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    position = getattr(config, "position_embedding_type", None) or arch.position_embedding
    return {
        "causal": arch.causal or bool(getattr(config, "is_decoder", False)),
        "num_key_value_heads": kv_heads,
        "position_embedding": "absolute" if position == "absolute" else
                              "rotary" if position == "rotary" else "relative",
    }


def _named_tokens(source: Path) -> dict[str, str]:
    """Special tokens by role (cls, sep, bos, ...) from special_tokens_map.json, else tokenizer_config.json."""
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = source / file
        if not path.exists():
            continue
        names = {}
        for key, value in json.loads(path.read_text()).items():
            if not key.endswith("_token"):
                continue
            text = value["content"] if isinstance(value, dict) else value
            if isinstance(text, str):
                names[key.removesuffix("_token")] = text
        if names:
            return names
    return {}


def special_tokens(source: Path, tokenizer: Any, config: Any = None) -> dict[str, dict[str, Any]]:
    """{role: {"text", "id"}} for the special tokens the tokenizer has (its files name
    them; bos/eos/pad from the config's ids when the files do not)."""
    out = {}
    for name, text in _named_tokens(source).items():
        token_id = tokenizer.token_to_id(text)
        if token_id is not None:
            out[name] = {"text": text, "id": int(token_id)}
    for name in ("bos", "eos", "pad"):
        config_id = getattr(config, f"{name}_token_id", None)
        config_text = tokenizer.id_to_token(config_id) if isinstance(config_id, int) else None
        if name not in out and config_text is not None:
            out[name] = {"text": config_text, "id": config_id}
    return out


def padding(config: Any, special: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """pad_token_id: the tokenizer's padding token, else the config's, else (decoders
    without one) the end-of-sequence token. Padded positions are masked out, so any
    token does; pad_token_source says which was taken."""
    if "pad" in special:
        return {"pad_token_id": special["pad"]["id"], "pad_token_source": "tokenizer"}
    if getattr(config, "pad_token_id", None) is not None:
        return {"pad_token_id": int(config.pad_token_id), "pad_token_source": "config"}
    if "eos" in special:
        return {"pad_token_id": special["eos"]["id"],
                "pad_token_source": f"eos ({special['eos']['text']}): the tokenizer has no padding token"}
    return {"pad_token_id": 0, "pad_token_source": "0: neither the tokenizer nor the config names one"}


def word_marks(tokenizer_file: Path) -> dict[str, str | None]:
    """How pieces mark words. WordPiece: continuing pieces start with "##"
    (continuing_subword_prefix). Byte-level BPE (GPT-2, RoBERTa): a piece that starts a
    word after a space starts with "Ġ"; SentencePiece-style (Llama): with "▁"
    (word_start_prefix). The first word of a text may carry no mark."""
    spec = json.loads(tokenizer_file.read_text())
    continuing = (spec.get("model") or {}).get("continuing_subword_prefix") or None
    around = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")], ensure_ascii=False)
    start = "Ġ" if '"ByteLevel"' in around else "▁" if "▁" in around else None
    return {"continuing_subword_prefix": continuing, "word_start_prefix": start}
