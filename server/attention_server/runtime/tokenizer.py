"""Tokenization with the model's own tokenizer.json (Hugging Face `tokenizers`).

Truncation and fixed-length padding are switched off whatever the file says:
the engine checks lengths against the model's positions and pads each runtime
batch only to its longest sequence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from ..errors import ModelLoadError
from .types import ModelMetadata, Tokens


def word_start_marker(config: Any) -> str | None:
    """The marker a word's first piece starts with, from a tokenizer.json's parts:
    "Ġ" for byte-level BPE (GPT-2, RoBERTa), the Metaspace replacement ("▁") for
    sentencepiece-style vocabularies (Llama); None for WordPiece."""
    found: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "ByteLevel":
                found.append("\u0120")
            elif kind == "Metaspace" and isinstance(node.get("replacement"), str):
                found.append(node["replacement"])
            elif kind == "Replace" and node.get("content") == "\u2581":
                found.append("\u2581")
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit({"normalizer": config.get("normalizer"), "pre_tokenizer": config.get("pre_tokenizer")})
    return found[0] if found else None


class TextTokenizer:
    def __init__(self, path: Path, metadata: ModelMetadata) -> None:
        """Load `path`; raises ModelLoadError naming the file when it is missing or unreadable."""
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing tokenizer file; re-export the model (make model)")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for every parse error
            raise ModelLoadError(f"{path}: not a valid tokenizer file ({exc}); "
                                 "re-export the model (make model)") from exc
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._prefix = metadata.continuing_subword_prefix
        self.word_start = metadata.word_start_prefix
        if self.word_start is None and not self._prefix:
            self.word_start = word_start_marker(json.loads(self._tokenizer.to_str()))
        self.special_ids = frozenset(int(t["id"]) for t in metadata.special_tokens.values())

    def encode(self, text: str, pair: str | None = None) -> Tokens:
        """Tokenize text (and an optional second segment), special tokens added."""
        return self._from_encoding(self._tokenizer.encode(text, pair, add_special_tokens=True))

    def encode_batch(self, items: list[tuple[str, str | None]]) -> list[Tokens]:
        inputs = [(t, p) if p is not None else t for t, p in items]
        return [self._from_encoding(e) for e in self._tokenizer.encode_batch(inputs, add_special_tokens=True)]

    def _from_encoding(self, enc: Encoding) -> Tokens:
        n = len(enc.ids)
        special = np.asarray(enc.special_tokens_mask, dtype=bool)
        offsets = np.asarray(enc.offsets, dtype=np.int32).reshape(n, 2)
        starts = np.where(special, -1, offsets[:, 0]).astype(np.int32)
        ends = np.where(special, -1, offsets[:, 1]).astype(np.int32)
        words = np.asarray([-1 if w is None else w for w in enc.word_ids], dtype=np.int32)
        words[special] = -1
        segment = np.asarray([0 if s is None else s for s in enc.sequence_ids], dtype=np.int32)
        # Special tokens belong to the segment they close ([SEP] after the pair is 1).
        return Tokens(
            ids=np.asarray(enc.ids, dtype=np.int64),
            type_ids=np.asarray(enc.type_ids, dtype=np.int64),
            texts=list(enc.tokens),
            starts=starts,
            ends=ends,
            word_index=words,
            special=special,
            segment=np.where(special, np.asarray(enc.type_ids, dtype=np.int32), segment),
        )

    def from_ids(self, ids: np.ndarray, type_ids: np.ndarray) -> Tokens:
        """Tokens for caller-given ids: no spans; words follow the vocabulary's markers
        (a continuation prefix, or a word-start marker for byte-level BPE)."""
        texts = [self._tokenizer.id_to_token(int(i)) or "" for i in ids]
        special = np.fromiter((int(i) in self.special_ids for i in ids), dtype=bool, count=len(ids))
        words = np.full(len(ids), -1, dtype=np.int32)
        word = -1
        for k, text in enumerate(texts):
            if special[k]:
                continue
            if self.word_start:  # byte-level / sentencepiece: a marker starts each word
                starts_word = text.startswith(self.word_start) or word < 0
            else:  # WordPiece: a prefix marks the pieces that continue a word
                starts_word = not (self._prefix and text.startswith(self._prefix) and word >= 0)
            if starts_word:
                word += 1
            words[k] = word
        none = np.full(len(ids), -1, dtype=np.int32)
        return Tokens(
            ids=ids.astype(np.int64, copy=False),
            type_ids=type_ids.astype(np.int64, copy=False),
            texts=texts,
            starts=none,
            ends=none.copy(),
            word_index=words,
            special=special,
            segment=type_ids.astype(np.int32),
        )
