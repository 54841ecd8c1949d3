"""Typed results that hand out numpy arrays."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import numpy as np
import numpy.typing as npt

from ._proto.attention.v1 import attention_pb2 as pb
from .errors import InvalidArgumentError
from .tensors import from_tensor

if TYPE_CHECKING:
    import torch

    from .bertviz import BertvizInput


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
    kv_head: int = 0
    """The key/value head this query head reads (GetModel; itself without grouped-query attention)."""


def _head_pairs(messages: Iterable[pb.HeadPairs]) -> list[HeadPairs]:
    return [HeadPairs(hp.head.layer, hp.head.index, [Pair(p.from_index, p.to_index, p.strength) for p in hp.pairs])
            for hp in messages]


FloatArray: TypeAlias = npt.NDArray[np.floating[Any]]
"""A float32 or float16 numpy array (float16 only for attention asked as "float16")."""

TensorName: TypeAlias = Literal["attention", "hidden_states", "word_attention", "rollout", "layer_hidden_states",
                                "queries", "keys"]
TENSORS: tuple[TensorName, ...] = ("attention", "hidden_states", "word_attention", "rollout", "layer_hidden_states",
                                   "queries", "keys")
# Serializes the one-time copy of a result's arrays (two threads reading one result).
_COPY_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class AnalyzeResult:
    """One sequence's result.

    Arrays (None when the call did not ask for them):

    - `attention` [len(layers), len(heads), seq, seq]: row i is where token i attends;
      float32, or float16 with attention_dtype="float16".
    - `hidden_states` [seq, hidden], float32.
    - `word_attention` [len(layers), len(heads), words, words] (word_level=True).
    - `rollout` [layers, seq, seq] (rollout="mean"/"max"/"min").
    - `layer_hidden_states` [len(hidden_states_layers), seq, hidden], float32, and
      `hidden_states_by_layer` {layer: [seq, hidden]} (hidden_states_layers=[...]).
    - `queries`, `keys` [len(layers), len(heads), seq, head_dim], float32 (query_key=True).

    They are ordinary writable numpy arrays owned by this result: torch.from_numpy,
    bertviz and in-place maths work without read-only warnings. They arrive as views
    into the received message (decoding copies nothing); the first read of any of them
    copies this result's arrays out of the message once and drops the views, so the
    message is freed once no result of it holds a view. Measured for a 75.5 MB attention
    (512 tokens, 6 x 12 heads, float32): 12-27 ms with tune_malloc(), 40-70 ms with
    glibc's defaults, against 1.0-1.7 s for the call itself. A result whose arrays are
    never read costs no copy.

    `tokens`, `pairs`, `words`, `word_pairs` and `head_statistics` are built from the
    message on first use.
    """

    index: int
    """Position of the sequence in its request."""
    id: str
    """The label given with the sequence (analyze_batch's `ids`), else ''."""
    layers: list[int]
    """The layers the matrices' first axis covers, by model numbering."""
    heads: list[int]
    """The heads the matrices' second axis covers, by model numbering."""
    _msg: pb.SequenceResult = field(repr=False)
    _arrays: dict[str, FloatArray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_parts(cls, msg: pb.SequenceResult, tensors: dict[str, npt.NDArray[Any]]) -> AnalyzeResult:
        """From a result whose tensors were decoded apart (see _wire)."""
        return cls(index=msg.index, id=msg.id, layers=list(msg.layers), heads=list(msg.heads), _msg=msg,
                   _arrays={k: v for k, v in tensors.items() if k in TENSORS})

    @classmethod
    def from_pb(cls, msg: pb.SequenceResult) -> AnalyzeResult:
        """From a fully parsed SequenceResult message."""
        arrays: dict[str, FloatArray] = {name: from_tensor(getattr(msg, name)) for name in TENSORS
                                         if msg.HasField(name)}
        return cls(index=msg.index, id=msg.id, layers=list(msg.layers), heads=list(msg.heads), _msg=msg,
                   _arrays=arrays)

    def __reduce__(self) -> tuple[Any, ...]:
        # The message class is not importable by the name pickle would use: send its bytes.
        return (_rebuild, (self.index, self.id, self.layers, self.heads, self._msg.SerializeToString(),
                           dict(self._arrays)))

    def _array(self, name: TensorName) -> FloatArray | None:
        array = self._arrays.get(name)
        if array is not None and not array.flags.owndata:
            with _COPY_LOCK:
                for key, value in self._arrays.items():
                    if not value.flags.owndata:
                        self._arrays[key] = value.copy()
                array = self._arrays[name]
        return array

    @property
    def attention(self) -> FloatArray | None:
        """[len(layers), len(heads), seq, seq]; None with attention=False."""
        return self._array("attention")

    @property
    def hidden_states(self) -> FloatArray | None:
        """[seq, hidden]; None with hidden_states=False."""
        return self._array("hidden_states")

    @property
    def word_attention(self) -> FloatArray | None:
        """[len(layers), len(heads), words, words]; None unless word_level=True (and attention=True)."""
        return self._array("word_attention")

    @property
    def rollout(self) -> FloatArray | None:
        """[layers, seq, seq]: entry l is the rollout through layers 0..l; None unless rollout was asked."""
        return self._array("rollout")

    @property
    def hidden_states_layers(self) -> list[int]:
        """The layers `layer_hidden_states` covers (0: embeddings .. num_layers: last layer)."""
        return list(self._msg.hidden_states_layers)

    @property
    def layer_hidden_states(self) -> FloatArray | None:
        """[len(hidden_states_layers), seq, hidden]; None unless hidden_states_layers was asked."""
        return self._array("layer_hidden_states")

    @property
    def hidden_states_by_layer(self) -> dict[int, FloatArray]:
        """{layer: [seq, hidden]} for the layers asked with hidden_states_layers (0: the
        embeddings, as Hugging Face's output_hidden_states[0]); empty when none were asked."""
        stacked = self.layer_hidden_states
        if stacked is None:
            return {}
        return {layer: stacked[k] for k, layer in enumerate(self.hidden_states_layers)}

    @property
    def queries(self) -> FloatArray | None:
        """[len(layers), len(heads), seq, head_dim] query vectors (query_key=True), else None.
        softmax(s * queries[l, h] @ keys[l, h].T + mask) is attention[l, h], with s the layer's
        ModelInfo.query_key_scaling (usually 1/sqrt(head_dim), not always)."""
        return self._array("queries")

    @property
    def keys(self) -> FloatArray | None:
        """[len(layers), len(heads), seq, head_dim] key vectors (query_key=True), else None; with
        grouped-query attention, those of the key/value head each query head reads."""
        return self._array("keys")

    @functools.cached_property
    def tokens(self) -> list[Token]:
        return [Token(t.id, t.text, t.start, t.end, t.word_index, t.special, t.segment) for t in self._msg.tokens]

    @functools.cached_property
    def pairs(self) -> list[HeadPairs]:
        """Per selected head, layer-major: its strongest pairs, strongest first (top_k=...)."""
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

    def head_attention(self, layer: int, head: int) -> FloatArray:
        """The [seq, seq] matrix of one (layer, head) by model numbering (a view of `attention`).

        InvalidArgumentError when attention was not asked for or the head is not in this result."""
        attention = self.attention
        if attention is None:
            raise InvalidArgumentError("attention: not in this result (analyze was called with attention=False)")
        if layer not in self.layers:
            raise InvalidArgumentError(f"layer: {layer} is not in this result (layers {self.layers})")
        if head not in self.heads:
            raise InvalidArgumentError(f"head: {head} is not in this result (heads {self.heads})")
        matrix: FloatArray = attention[self.layers.index(layer), self.heads.index(head)]
        return matrix

    @overload
    def to_bertviz(self, framework: Literal["torch"] = "torch") -> BertvizInput[torch.Tensor]: ...

    @overload
    def to_bertviz(self, framework: Literal["numpy"]) -> BertvizInput[FloatArray]: ...

    def to_bertviz(self, framework: Literal["torch", "numpy"] = "torch") -> BertvizInput[Any]:
        """(attention, tokens, sentence_b_start) as bertviz's head_view/model_view take them:
        `head_view(*result.to_bertviz())`. Torch tensors by default (bertviz needs them; torch
        is imported only here), numpy with framework="numpy". Needs layers 0..L-1 and heads
        0..H-1; see attention_client.bertviz."""
        from .bertviz import to_bertviz

        return to_bertviz(self, framework)

    def pair_rows(self) -> list[tuple[int, int, str, str, float]]:
        """(layer, head, from token, to token, strength) for every returned pair."""
        texts = self.token_texts
        return [
            (hp.layer, hp.head, texts[p.from_index], texts[p.to_index], p.strength)
            for hp in self.pairs
            for p in hp.pairs
        ]


def _rebuild(index: int, id: str, layers: list[int], heads: list[int], msg: bytes,
             arrays: dict[str, FloatArray]) -> AnalyzeResult:
    """Unpickle an AnalyzeResult (its arrays arrive as arrays of their own)."""
    return AnalyzeResult(index, id, layers, heads, pb.SequenceResult.FromString(msg), arrays)


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
    model_type: str = ""
    causal: bool = False
    """Token i attends to tokens 0..i only (a decoder); attention is zero above the diagonal."""
    num_key_value_heads: int = 0
    """Fewer than num_heads with grouped-query attention (`Head.kv_head` says which one a head reads)."""
    position_embedding: str = ""
    """"absolute" or "rotary"."""
    head_dim: int = 0
    supports_hidden_states_layers: bool = False
    supports_query_key: bool = False
    query_key_scaling: list[float] = field(default_factory=list)
    """Per layer: attention = softmax(query_key_scaling[l] * q @ k.T + mask) (usually 1/sqrt(head_dim))."""

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
            heads=[Head(h.layer, h.index, h.role, dict(h.statistics), h.family, h.role_score, h.kv_head)
                   for h in msg.heads],
            max_batch_size=msg.max_batch_size,
            model_type=msg.model_type,
            causal=msg.causal,
            num_key_value_heads=msg.num_key_value_heads,
            position_embedding=msg.position_embedding,
            head_dim=msg.head_dim,
            supports_hidden_states_layers=msg.supports_hidden_states_layers,
            supports_query_key=msg.supports_query_key,
            query_key_scaling=list(msg.query_key_scaling),
        )
