"""Builds AnalyzeRequest messages from the SDK's typed arguments (shared by the sync
and asyncio clients), refusing bad values before any call.

Checked here, with the server's message style (`options.top_k: must be ...`):
types, and every limit that does not depend on the model. Limits of the model
(layer and head ranges, positions, vocabulary, batch size) are the server's to check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from ._proto.attention.v1 import attention_pb2 as pb
from .errors import InvalidArgumentError

TokenIds: TypeAlias = Sequence[int] | npt.NDArray[np.integer[Any]]
"""Token ids of one sequence, used as given (special tokens included): a list or 1-D integer array."""

SequenceInput: TypeAlias = str | TokenIds
"""One sequence: text (tokenized by the server, special tokens added) or token ids."""

AttentionDType: TypeAlias = Literal["float32", "float16"]
Fusion: TypeAlias = Literal["mean", "max", "min"]

DTYPES: dict[str, pb.DataType.ValueType] = {"float32": pb.DATA_TYPE_FLOAT32, "float16": pb.DATA_TYPE_FLOAT16}
ROLLOUT: dict[str, pb.RolloutFusion.ValueType] = {"mean": pb.ROLLOUT_MEAN, "max": pb.ROLLOUT_MAX,
                                                  "min": pb.ROLLOUT_MIN}
INT32_MAX = 2**31 - 1


def invalid(field: str, message: str) -> InvalidArgumentError:
    """A bad value, reported as the server reports one: `field: message`."""
    return InvalidArgumentError(f"{field}: {message}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 64 else f"{text[:60]}...{text[-1]}"


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_bool(value: object) -> bool:
    return isinstance(value, (bool, np.bool_))


def _indices(field: str, values: Iterable[int] | None, what: str) -> list[int]:
    """None: every one (an empty list on the wire). An empty list or a bare number is an error:
    neither may silently mean "all"."""
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise invalid(field, f"must be a list of {what} indices such as [0, 1], or None for all {what}s; "
                             f"got {_short(values)}")
    items = list(values)
    if not items:
        raise invalid(field, f"must not be empty; list at least one {what}, or pass None (the default) for all {what}s")
    seen: set[int] = set()
    for k, v in enumerate(items):
        if not _is_int(v):
            raise invalid(f"{field}[{k}]", f"must be an integer {what} index, got {_short(v)}")
        if not 0 <= v <= INT32_MAX:
            raise invalid(f"{field}[{k}]", f"{what} {v} is out of range; indices start at 0")
        if v in seen:
            raise invalid(f"{field}[{k}]", f"{what} {v} is listed twice")
        seen.add(int(v))
    return [int(v) for v in items]


def _hidden_states_layers(values: Iterable[int] | None) -> list[int]:
    """None: none. Layers are numbered as Hugging Face's output_hidden_states (0: embeddings)."""
    field = "options.hidden_states_layers"
    if values is not None and not isinstance(values, (str, bytes)) and isinstance(values, Iterable):
        values = list(values)
        if not values:
            raise invalid(field, "must not be empty; list at least one layer (0: embeddings), or pass None "
                                 "(the default) for none")
    try:
        return _indices(field, values, "layer")
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(str(exc).replace("or None for all layers", "or None for none")) from None


def _flag(field: str, value: object) -> bool:
    if not _is_bool(value):
        raise invalid(field, f"must be True or False, got {_short(value)}")
    return bool(value)


def build_options(
    *,
    layers: Iterable[int] | None,
    heads: Iterable[int] | None,
    attention: bool,
    attention_dtype: AttentionDType,
    hidden_states: bool,
    top_k: int | None,
    min_strength: float,
    exclude_special_tokens: bool,
    word_level: bool,
    head_statistics: bool,
    rollout: Fusion | None,
    hidden_states_layers: Iterable[int] | None = None,
    query_key: bool = False,
) -> pb.AnalyzeOptions:
    """Validated AnalyzeOptions (InvalidArgumentError naming the first bad field)."""
    options = pb.AnalyzeOptions(
        layers=_indices("options.layers", layers, "layer"),
        heads=_indices("options.heads", heads, "head"),
        attention=_flag("options.attention", attention),
        hidden_states=_flag("options.hidden_states", hidden_states),
        exclude_special_tokens=_flag("options.exclude_special_tokens", exclude_special_tokens),
        word_level=_flag("options.word_level", word_level),
        head_statistics=_flag("options.head_statistics", head_statistics),
        hidden_states_layers=_hidden_states_layers(hidden_states_layers),
        query_key=_flag("options.query_key", query_key),
    )
    if attention_dtype not in DTYPES:
        raise invalid("options.attention_dtype", f"must be 'float32' or 'float16', got {_short(attention_dtype)}")
    options.attention_dtype = DTYPES[attention_dtype]
    if top_k is not None:
        if not _is_int(top_k):
            raise invalid("options.top_k", f"must be an integer (or None for no pairs), got {_short(top_k)}")
        if not 1 <= top_k <= INT32_MAX:
            raise invalid("options.top_k", f"must be at least 1 when set (None for no pairs), got {top_k}")
        options.top_k = int(top_k)
    if _is_bool(min_strength) or not isinstance(min_strength, (int, float, np.integer, np.floating)):
        raise invalid("options.min_strength", f"must be a number within [0, 1], got {_short(min_strength)}")
    if math.isnan(min_strength) or not 0.0 <= min_strength <= 1.0:
        raise invalid("options.min_strength", f"must be within [0, 1], got {min_strength}")
    options.min_strength = float(min_strength)
    if rollout is not None:
        if rollout not in ROLLOUT:
            raise invalid("options.rollout", f"{_short(rollout)} is not a fusion; use 'mean', 'max' or 'min' "
                                             "(or None for no rollout)")
        options.rollout = ROLLOUT[rollout]
    return options


def _sequence(item: object, text_pair: object, seq_id: str, index: int, batch: bool) -> pb.Sequence:
    field = f"sequences[{index}]"
    pair_field = f"text_pairs[{index}]" if batch else f"{field}.text_pair"
    if text_pair is not None and not isinstance(text_pair, str):
        raise invalid(pair_field, f"must be text or None, got {_short(text_pair)}")
    if isinstance(item, str):
        return pb.Sequence(text=item, text_pair=text_pair or "", id=seq_id)
    if isinstance(item, (bytes, bytearray)):
        raise invalid(field, "must be text (str) or token ids, got bytes; decode the text first")
    if isinstance(item, (list, tuple)) and any(isinstance(x, (str, list, tuple, np.ndarray)) for x in item):
        if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
            hint = "text_pairs=[...]" if batch else "text_pair=..."
            raise invalid(field, f"a (text, text_pair) tuple is not one sequence; pass the second text as {hint}")
        if batch:
            raise invalid(field, "must be text or token ids, not a list of sequences")
        raise invalid(field, "a list of sequences is a batch: use analyze_batch([...]) or analyze_stream([...])")
    if not isinstance(item, (Sequence, np.ndarray)):
        raise invalid(field, f"must be text (str) or token ids (a list or 1-D array of int), got "
                             f"{type(item).__name__}")
    ids = np.asarray(item)
    if ids.ndim != 1 or not (ids.size == 0 or ids.dtype.kind in "iu"):
        raise invalid(f"{field}.token_ids.ids", f"token ids must be a flat list or 1-D array of integers, got "
                                                f"{_short(item)}")
    if ids.size and (ids.dtype.kind == "u" and ids.max() > np.iinfo(np.int64).max):
        raise invalid(f"{field}.token_ids.ids", "token ids must fit int64")
    if text_pair is not None:
        raise invalid(pair_field, "a text pair goes with text, not with token ids")
    return pb.Sequence(token_ids=pb.TokenIds(ids=ids.astype(np.int64).tolist()), id=seq_id)


def single_request(sequence: SequenceInput, *, text_pair: str | None, model: str,
                   options: pb.AnalyzeOptions) -> pb.AnalyzeRequest:
    """A request for one sequence (what analyze sends)."""
    _check_model(model)
    return pb.AnalyzeRequest(model=model, options=options,
                             sequences=[_sequence(sequence, text_pair, "", 0, batch=False)])


def batch_request(sequences: Iterable[SequenceInput], *, text_pairs: Sequence[str | None] | None,
                  ids: Sequence[str] | None, model: str, options: pb.AnalyzeOptions) -> pb.AnalyzeRequest:
    """A request for a batch, in order (what analyze_batch and analyze_stream send)."""
    _check_model(model)
    if isinstance(sequences, (str, bytes)):
        raise invalid("sequences", "a str is one sequence: use analyze(text), or analyze_batch([text]) for a "
                                   "batch of one")
    if not isinstance(sequences, Iterable):
        raise invalid("sequences", f"must be a list of sequences, got {type(sequences).__name__}")
    items = list(sequences)
    if not items:
        raise invalid("sequences", "empty batch; give at least one sequence")
    if items and all(_is_int(x) for x in items):
        raise invalid("sequences", "a flat list of ints is one sequence of token ids: use analyze(ids), or "
                                   "analyze_batch([ids]) for a batch of one")
    pairs = _parallel("text_pairs", text_pairs, len(items))
    labels = _parallel("ids", ids, len(items))
    for k, label in enumerate(labels):
        if label is not None and not isinstance(label, str):
            raise invalid(f"ids[{k}]", f"must be a str, got {_short(label)}")
    return pb.AnalyzeRequest(model=model, options=options, sequences=[
        _sequence(item, pair, label or "", k, batch=True)
        for k, (item, pair, label) in enumerate(zip(items, pairs, labels, strict=True))])


def _parallel(field: str, values: Sequence[Any] | None, n: int) -> list[Any]:
    if values is None:
        return [None] * n
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise invalid(field, f"must be a list with one entry per sequence, got {_short(values)}")
    items = list(values)
    if len(items) != n:
        raise invalid(field, f"has {len(items)} entries for {n} sequences")
    return items


def _check_model(model: object) -> None:
    if not isinstance(model, str):
        raise invalid("model", f"must be a model name (str; '' for the server's default), got {_short(model)}")


def check_timeout(timeout: object) -> None:
    if timeout is None:
        return
    if _is_bool(timeout) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout <= 0:
        raise invalid("timeout", f"must be a positive number of seconds (or None), got {_short(timeout)}")
