"""Types shared by the runtime's modules and the transport layers: plain data and the
interfaces of a model's parts. Every runtime module imports from here; this module
imports none of them."""

from __future__ import annotations

import json
import math
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
# model.json's position_embedding values (attention-export writes "relative" for BERT-style
# relative_key positions).
POSITION_EMBEDDINGS = ("absolute", "rotary", "relative")


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
    # Hidden states of these layer boundaries (0: embeddings .. num_layers: last layer, as
    # Hugging Face's output_hidden_states); empty: none (`hidden_states` is the last layer's).
    hidden_states_layers: Sequence[int] = ()
    # Query and key vectors of the selected layers/heads (what bertviz's neuron view draws).
    query_key: bool = False


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
    hidden_states_layers: list[int] = field(default_factory=list)
    layer_hidden_states: np.ndarray | None = None  # [len(hidden_states_layers), n, hidden] float32
    queries: np.ndarray | None = None  # [layers, heads, n, head_dim] float32
    keys: np.ndarray | None = None  # [layers, heads, n, head_dim] float32, the key each query head reads


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
    continuing_subword_prefix: str  # "" (or null in model.json) for byte-level BPE
    inputs: list[str]
    outputs: list[str]
    opset: int
    onnx_file: str
    tokenizer_file: str
    sha256: str
    type_vocab_size: int = 2
    model_type: str = ""
    causal: bool = False
    """Token i attends to tokens 0..i only (decoders); their attention is zero above the diagonal."""
    num_key_value_heads: int = 0
    """Key/value heads (grouped-query attention when fewer than num_heads); 0 in model.json: num_heads."""
    position_embedding: str = "absolute"
    """"absolute" (learned or sinusoidal positions added to the embeddings) or "rotary"."""
    word_start_prefix: str | None = None
    """Marker a word's first piece starts with in byte-level / sentencepiece vocabularies ("Ġ", "▁")."""
    head_dim: int = 0
    """Size of one head's query/key vectors; 0 in model.json: hidden_size // num_heads."""
    hidden_states_outputs: list[str] = field(default_factory=list)
    """Graph outputs of the hidden states, index 0 the embeddings .. num_layers the last layer."""
    query_outputs: list[str] = field(default_factory=list)
    """Graph outputs of each layer's query vectors [batch, num_heads, seq, head_dim]."""
    key_outputs: list[str] = field(default_factory=list)
    """Graph outputs of each layer's key vectors, expanded to the query heads."""

    query_key_scaling: list[float] = field(default_factory=list)
    """Per layer, the factor of query . key in the attention logits (empty: 1/sqrt(head_dim))."""

    def __post_init__(self) -> None:
        self._check_types()
        if self.head_dim <= 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)  # num_heads > 0: _check_types
        if self.num_key_value_heads <= 0:
            object.__setattr__(self, "num_key_value_heads", self.num_heads)
        if self.continuing_subword_prefix is None:
            object.__setattr__(self, "continuing_subword_prefix", "")
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_key_value_heads "
                             f"{self.num_key_value_heads}")
        for name, outputs, count in (("hidden_states_outputs", self.hidden_states_outputs, self.num_layers + 1),
                                     ("query_outputs", self.query_outputs, self.num_layers),
                                     ("key_outputs", self.key_outputs, self.num_layers)):
            if outputs and len(outputs) != count:
                raise ValueError(f"{name} lists {len(outputs)} outputs; the model has {count}")
        if self.query_key_scaling and len(self.query_key_scaling) != self.num_layers:
            raise ValueError(f"query_key_scaling lists {len(self.query_key_scaling)} factors; the model has "
                             f"{self.num_layers} layers")
        if bool(self.query_outputs) != bool(self.key_outputs):
            raise ValueError("query_outputs and key_outputs go together")

    def _check_types(self) -> None:
        """Refuse values of the wrong type or sign (ValueError naming the field): model.json is
        read as JSON, and a string "false" for `causal` or a negative head count would otherwise
        load and mislead every caller, or fail later as INTERNAL on every GetModel/ListModels."""
        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("num_layers", "num_heads", "hidden_size"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: the default), got {value!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be true or false, got {self.causal!r}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {list(POSITION_EMBEDDINGS)}, "
                             f"got {self.position_embedding!r}")
        if not (self.word_start_prefix is None or isinstance(self.word_start_prefix, str)):
            raise ValueError(f"word_start_prefix must be a string or null, got {self.word_start_prefix!r}")
        for name in ("hidden_states_outputs", "query_outputs", "key_outputs"):
            names = getattr(self, name)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{name} must be a list of output names, got {names!r}")
        scaling = self.query_key_scaling
        if not isinstance(scaling, list) or not all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0
                for f in scaling):
            raise ValueError(f"query_key_scaling must be a list of positive numbers, got {scaling!r}")

    def scaling(self, layer: int) -> float:
        """The factor of query . key in layer `layer`'s attention logits."""
        return float(self.query_key_scaling[layer]) if self.query_key_scaling else self.head_dim ** -0.5

    def kv_head(self, head: int) -> int:
        """The key/value head query head `head` reads (Hugging Face's repeat_kv order)."""
        return head // (self.num_heads // self.num_key_value_heads)

    @property
    def extra_outputs(self) -> list[str]:
        """Outputs beyond the default ones (fetched only when a request asks for them)."""
        return [*self.hidden_states_outputs, *self.query_outputs, *self.key_outputs]

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
        size += self.hidden_states_layers_bytes(index) + self.query_key_bytes(index)
        return size

    def hidden_states_layers_bytes(self, index: int) -> int:
        """The part of `sequence_bytes` that hidden_states_layers adds (float32 [k, n, hidden])."""
        layers = len(self.options.hidden_states_layers)
        return layers * len(self.tokens[index]) * self.model.metadata.hidden_size * 4 + (32 if layers else 0)

    def query_key_bytes(self, index: int) -> int:
        """The part of `sequence_bytes` that query_key adds (two float32 [layers, heads, n, head_dim])."""
        if not self.options.query_key:
            return 0
        n, meta = len(self.tokens[index]), self.model.metadata
        return 2 * (len(self.layers) * len(self.heads) * n * meta.head_dim * 4 + 32)
