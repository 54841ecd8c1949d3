"""Typed results that hand out numpy arrays."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ._proto.attention.v1 import attention_pb2 as pb
from .tensors import from_tensor


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    start: int  # character span [start, end) in the input text; -1 if none
    end: int
    word_index: int  # -1 for special tokens
    special: bool
    segment: int


@dataclass(frozen=True)
class Pair:
    """`from_index` attends to `to_index` with `strength` (0..1)."""

    from_index: int
    to_index: int
    strength: float


@dataclass(frozen=True)
class HeadPairs:
    layer: int
    head: int
    pairs: list[Pair]


@dataclass(frozen=True)
class Word:
    """A word of the word-level view (its tokens are [first_token, end_token)) or a special token."""

    text: str
    start: int
    end: int
    first_token: int
    end_token: int
    special: bool
    segment: int


@dataclass(frozen=True)
class Head:
    layer: int
    index: int
    role: str = ""
    statistics: dict[str, float] = field(default_factory=dict)
    family: str = ""
    role_score: float = 0.0


def _head_pairs(messages: Iterable[pb.HeadPairs]) -> list[HeadPairs]:
    return [HeadPairs(hp.head.layer, hp.head.index, [Pair(p.from_index, p.to_index, p.strength) for p in hp.pairs])
            for hp in messages]


@dataclass(frozen=True)
class AnalyzeResult:
    """One sequence's result. `attention` is [len(layers), len(heads), seq, seq]
    (row i: where token i attends), `hidden_states` is [seq, hidden]. `tokens`
    and `pairs` are built from the message on first use."""

    index: int
    id: str
    layers: list[int]
    heads: list[int]
    attention: np.ndarray | None
    hidden_states: np.ndarray | None
    _msg: pb.SequenceResult = field(repr=False, compare=False)
    word_attention: np.ndarray | None = None
    rollout: np.ndarray | None = None

    @classmethod
    def from_parts(cls, msg: pb.SequenceResult, tensors: dict[str, np.ndarray]) -> AnalyzeResult:
        """From a result whose tensors were decoded apart (see _wire)."""
        return cls(
            index=msg.index,
            id=msg.id,
            layers=list(msg.layers),
            heads=list(msg.heads),
            attention=tensors.get("attention"),
            hidden_states=tensors.get("hidden_states"),
            _msg=msg,
            word_attention=tensors.get("word_attention"),
            rollout=tensors.get("rollout"),
        )

    @classmethod
    def from_pb(cls, msg: pb.SequenceResult) -> AnalyzeResult:
        return cls(
            index=msg.index,
            id=msg.id,
            layers=list(msg.layers),
            heads=list(msg.heads),
            attention=from_tensor(msg.attention) if msg.HasField("attention") else None,
            hidden_states=from_tensor(msg.hidden_states) if msg.HasField("hidden_states") else None,
            _msg=msg,
            word_attention=from_tensor(msg.word_attention) if msg.HasField("word_attention") else None,
            rollout=from_tensor(msg.rollout) if msg.HasField("rollout") else None,
        )

    @functools.cached_property
    def tokens(self) -> list[Token]:
        return [Token(t.id, t.text, t.start, t.end, t.word_index, t.special, t.segment) for t in self._msg.tokens]

    @functools.cached_property
    def pairs(self) -> list[HeadPairs]:
        """Per selected head, layer-major: its strongest pairs, strongest first."""
        return _head_pairs(self._msg.pairs)

    @functools.cached_property
    def words(self) -> list[Word]:
        """The word-level units (word_level=True)."""
        return [Word(w.text, w.start, w.end, w.first_token, w.end_token, w.special, w.segment)
                for w in self._msg.words]

    @functools.cached_property
    def word_pairs(self) -> list[HeadPairs]:
        """Per selected head, its strongest word pairs (indices into `words`)."""
        return _head_pairs(self._msg.word_pairs)

    @functools.cached_property
    def head_statistics(self) -> list[Head]:
        """Per selected head, its statistics on this sequence (head_statistics=True)."""
        return [Head(h.layer, h.index, h.role, dict(h.statistics)) for h in self._msg.head_statistics]

    def word_pair_rows(self) -> list[tuple[int, int, str, str, float]]:
        """(layer, head, from word, to word, strength) for every returned word pair."""
        texts = [w.text for w in self.words]
        return [(hp.layer, hp.head, texts[p.from_index], texts[p.to_index], p.strength)
                for hp in self.word_pairs for p in hp.pairs]

    @property
    def token_texts(self) -> list[str]:
        return [t.text for t in self.tokens]

    def head_attention(self, layer: int, head: int) -> np.ndarray:
        """The [seq, seq] matrix of one (layer, head) by model numbering."""
        if self.attention is None:
            raise ValueError("attention matrices were not requested (attention=False)")
        return self.attention[self.layers.index(layer), self.heads.index(head)]

    def pair_rows(self) -> list[tuple[int, int, str, str, float]]:
        """(layer, head, from token, to token, strength) for every returned pair."""
        texts = self.token_texts
        return [
            (hp.layer, hp.head, texts[p.from_index], texts[p.to_index], p.strength)
            for hp in self.pairs
            for p in hp.pairs
        ]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    architecture: str
    num_layers: int
    num_heads: int
    hidden_size: int
    max_positions: int
    vocab_size: int
    special_tokens: dict[str, tuple[str, int]]
    input_names: list[str]
    output_names: list[str]
    opset: int
    sha256: str
    heads: list[Head]
    max_batch_size: int

    @classmethod
    def from_pb(cls, msg: pb.ModelInfo) -> ModelInfo:
        return cls(
            name=msg.name,
            source=msg.source,
            architecture=msg.architecture,
            num_layers=msg.num_layers,
            num_heads=msg.num_heads,
            hidden_size=msg.hidden_size,
            max_positions=msg.max_positions,
            vocab_size=msg.vocab_size,
            special_tokens={t.name: (t.text, t.id) for t in msg.special_tokens},
            input_names=list(msg.input_names),
            output_names=list(msg.output_names),
            opset=msg.opset,
            sha256=msg.sha256,
            heads=[Head(h.layer, h.index, h.role, dict(h.statistics), h.family, h.role_score) for h in msg.heads],
            max_batch_size=msg.max_batch_size,
        )
