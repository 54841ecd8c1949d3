"""Tokenization with the model's own tokenizer.json (Hugging Face `tokenizers`).

Truncation and fixed-length padding are switched off whatever the file says:
the engine checks lengths against the model's positions and pads each runtime
batch only to its longest sequence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from ..errors import ModelLoadError
from .types import ModelMetadata, Tokens


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
        """Tokens for caller-given ids: no spans; words follow the subword prefix rule."""
        texts = [self._tokenizer.id_to_token(int(i)) or "" for i in ids]
        special = np.fromiter((int(i) in self.special_ids for i in ids), dtype=bool, count=len(ids))
        words = np.full(len(ids), -1, dtype=np.int32)
        word = -1
        for k, text in enumerate(texts):
            if special[k]:
                continue
            if not (self._prefix and text.startswith(self._prefix) and word >= 0):
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
