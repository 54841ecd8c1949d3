"""Types shared by the runtime's modules and the transport layers: plain data and the
interfaces of a model's parts. Every runtime module imports from here; this module
imports none of them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import ModelLoadError

FLOAT32 = "float32"
FLOAT16 = "float16"

# Rough size of one token (id, text, span, flags) and one (from, to, strength) pair in a result.
TOKEN_BYTES = 40
PAIR_BYTES = 16


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
    words: Words | None = None
    word_attention: np.ndarray | None = None  # [layers, heads, words, words]
    word_pairs: PairTable | None = None
    head_statistics: np.ndarray | None = None  # [layers, heads, len(heads.STATISTICS)] float32
    rollout: np.ndarray | None = None  # [num_layers, n, n] float32


@dataclass(frozen=True)
class Words:
    """Units of the word-level view: a word (its pieces) or one special token."""

    texts: list[str]
    token_start: np.ndarray  # int32 [w]: first token of the unit
    token_end: np.ndarray  # int32 [w]: one past its last token
    starts: np.ndarray  # int32 [w]: character span in the segment's text, -1 if none
    ends: np.ndarray
    special: np.ndarray  # bool [w]
    segment: np.ndarray  # int32 [w]
    unit_of_token: np.ndarray  # int32 [n]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class HeadRole:
    layer: int
    head: int
    role: str
    family: str
    score: float
    statistics: dict[str, float]


@dataclass(frozen=True)
class ModelMetadata:
    """What model.json says about an exported model (written by attention-export)."""

    name: str
    source: str
    architecture: str
    num_layers: int
    num_heads: int
    hidden_size: int
    max_positions: int
    vocab_size: int
    special_tokens: dict[str, dict[str, Any]]
    pad_token_id: int
    continuing_subword_prefix: str
    inputs: list[str]
    outputs: list[str]
    opset: int
    onnx_file: str
    tokenizer_file: str
    sha256: str
    type_vocab_size: int = 2

    @classmethod
    def from_file(cls, path: Path) -> ModelMetadata:
        try:
            raw = json.loads(path.read_text())
            fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            return cls(**fields)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelLoadError(f"{path}: unreadable model metadata ({exc}); "
                                 "re-export the model (make model)") from exc

class Tokenizer(Protocol):
    """What the engine needs of a model's tokenizer (tokenizer.TextTokenizer)."""

    special_ids: frozenset[int]

    def encode(self, text: str, pair: str | None = None) -> Tokens: ...

    def encode_batch(self, items: list[tuple[str, str | None]]) -> list[Tokens]: ...

    def from_ids(self, ids: np.ndarray, type_ids: np.ndarray) -> Tokens: ...


class Runtime(Protocol):
    """What the engine needs of a model's runtime (onnx_model.OnnxModel)."""

    instances: int

    def run(self, feed: dict[str, np.ndarray], outputs: list[str], wide: bool = True,
            into: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve: its metadata, tokenizer, ONNX Runtime sessions and head roles."""

    metadata: ModelMetadata
    tokenizer: Tokenizer
    runtime: Runtime
    path: Path
    roles: list[HeadRole] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.metadata.name


@dataclass(frozen=True)
class Plan:
    """A validated request: its model, tokens, resolved layers/heads and outputs."""

    model: LoadedModel
    inputs: list[SequenceInput]
    tokens: list[Tokens]
    options: AnalyzeOptions
    layers: list[int]
    heads: list[int]

    def sequence_bytes(self, index: int) -> int:
        """Upper estimate of one sequence's result size (its arrays, tokens and pairs; about
        what it takes in memory and on the wire)."""
        n = len(self.tokens[index])
        options = self.options
        size = n * TOKEN_BYTES + 256
        cells = len(self.layers) * len(self.heads) * n * n
        if options.attention:
            size += cells * (2 if options.attention_dtype == FLOAT16 else 4)
        if options.hidden_states:
            size += n * self.model.metadata.hidden_size * 4
        if options.top_k is not None:
            pairs = len(self.layers) * len(self.heads) * (min(options.top_k, n * n) * PAIR_BYTES + 16)
            size += pairs * (2 if options.word_level else 1)
        if options.word_level:
            size += n * TOKEN_BYTES + (cells * 4 if options.attention else 0)
        if options.head_statistics:
            size += len(self.layers) * len(self.heads) * 200
        if options.rollout is not None:
            size += self.model.metadata.num_layers * n * n * 4
        return size
