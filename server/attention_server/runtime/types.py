"""Plain data passed between the transport layer and the runtime."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FLOAT32 = "float32"
FLOAT16 = "float16"


@dataclass(frozen=True)
class SequenceInput:
    """One sequence as the caller gave it: text (optionally a pair) or token ids."""

    text: str | None = None
    text_pair: str | None = None
    # Any sized sequence of ints (a tuple, a protobuf repeated field, a numpy row):
    # the engine checks its length before copying it.
    token_ids: Sequence[int] | np.ndarray | None = None
    type_ids: Sequence[int] | np.ndarray | None = None
    id: str = ""


@dataclass(frozen=True)
class AnalyzeOptions:
    layers: Sequence[int] = ()
    heads: Sequence[int] = ()
    attention_dtype: str = FLOAT32
    attention: bool = True
    hidden_states: bool = True
    top_k: int | None = None
    min_strength: float = 0.0
    exclude_special_tokens: bool = False
    word_level: bool = False
    head_statistics: bool = False
    rollout: str | None = None  # "mean", "max" or "min"


@dataclass(frozen=True)
class Tokens:
    """The tokens of one sequence, as parallel arrays (one entry per token)."""

    ids: np.ndarray  # int64 [n]
    type_ids: np.ndarray  # int64 [n]
    texts: list[str]
    starts: np.ndarray  # int32 [n], -1 without a span
    ends: np.ndarray  # int32 [n]
    word_index: np.ndarray  # int32 [n], -1 for special tokens
    special: np.ndarray  # bool [n]
    segment: np.ndarray  # int32 [n]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class PairTable:
    """Strongest (from, to) pairs of every selected head, strongest first.
    Row r is head (layers[r], heads[r]); its first counts[r] entries are valid."""

    layers: np.ndarray  # int32 [rows]
    heads: np.ndarray  # int32 [rows]
    from_index: np.ndarray  # int32 [rows, k]
    to_index: np.ndarray  # int32 [rows, k]
    strength: np.ndarray  # float32 [rows, k]
    counts: np.ndarray  # int32 [rows]

    def head_pairs(self, row: int) -> list[tuple[int, int, float]]:
        """(from, to, strength) of one row, for reading and tests."""
        n = int(self.counts[row])
        return list(zip(self.from_index[row, :n].tolist(), self.to_index[row, :n].tolist(),
                        self.strength[row, :n].tolist(), strict=True))


@dataclass
class SequenceOutput:
    index: int
    id: str
    tokens: Tokens
    layers: list[int]
    heads: list[int]
    attention: np.ndarray | None = None  # [layers, heads, n, n], C-contiguous
    hidden_states: np.ndarray | None = None  # [n, hidden] float32
    pairs: PairTable | None = None
    words: Any = None  # heads.Words
    word_attention: np.ndarray | None = None  # [layers, heads, words, words]
    word_pairs: PairTable | None = None
    head_statistics: np.ndarray | None = None  # [layers, heads, len(heads.STATISTICS)] float32
    rollout: np.ndarray | None = None  # [num_layers, n, n] float32
