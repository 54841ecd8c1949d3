"""Builds AnalyzeRequest messages from friendly Python arguments (shared by the
sync and asyncio clients)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Union

import numpy as np

from ._proto.attention.v1 import attention_pb2 as pb

# A sequence is text, a (text, text_pair) tuple, or token ids.
SequenceLike = Union[str, tuple[str, str], Sequence[int], np.ndarray]  # noqa: UP007 (py3.10 alias)

DTYPES = {"float32": pb.DATA_TYPE_FLOAT32, "float16": pb.DATA_TYPE_FLOAT16}
ROLLOUT = {"mean": pb.ROLLOUT_MEAN, "max": pb.ROLLOUT_MAX, "min": pb.ROLLOUT_MIN}


def _sequence(item: SequenceLike, seq_id: str) -> pb.Sequence:
    if isinstance(item, str):
        return pb.Sequence(text=item, id=seq_id)
    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return pb.Sequence(text=item[0], text_pair=item[1], id=seq_id)
    ids = np.asarray(item)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise TypeError(f"a sequence must be text, (text, text_pair) or a 1-D list of token ids, got {item!r:.80}")
    return pb.Sequence(token_ids=pb.TokenIds(ids=ids.tolist()), id=seq_id)


def build_request(
    sequences: SequenceLike | Iterable[SequenceLike],
    *,
    model: str = "",
    layers: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    top_k: int | None = None,
    min_strength: float = 0.0,
    exclude_special_tokens: bool = False,
    attention: bool = True,
    hidden_states: bool = True,
    attention_dtype: str = "float32",
    ids: Iterable[str] | None = None,
    word_level: bool = False,
    head_statistics: bool = False,
    rollout: str | None = None,
) -> tuple[pb.AnalyzeRequest, bool]:
    """The request, and whether the caller passed a single sequence."""
    single = isinstance(sequences, str) or (isinstance(sequences, tuple) and len(sequences) == 2
                                            and all(isinstance(x, str) for x in sequences))
    items = [sequences] if single else list(sequences)  # type: ignore[arg-type]
    if items and all(isinstance(x, (int, np.integer)) for x in items):
        single, items = True, [items]  # one list of token ids
    labels = list(ids) if ids is not None else [""] * len(items)
    if len(labels) != len(items):
        raise ValueError(f"ids has {len(labels)} entries for {len(items)} sequences")
    if attention_dtype not in DTYPES:
        raise ValueError(f"attention_dtype must be one of {sorted(DTYPES)}, got {attention_dtype!r}")
    options = pb.AnalyzeOptions(
        layers=list(layers or []),
        heads=list(heads or []),
        attention_dtype=DTYPES[attention_dtype],
        attention=attention,
        hidden_states=hidden_states,
        min_strength=min_strength,
        exclude_special_tokens=exclude_special_tokens,
        word_level=word_level,
        head_statistics=head_statistics,
    )
    if rollout is not None:
        if rollout not in ROLLOUT:
            raise ValueError(f"rollout must be one of {sorted(ROLLOUT)}, got {rollout!r}")
        options.rollout = ROLLOUT[rollout]
    if top_k is not None:
        options.top_k = top_k
    request = pb.AnalyzeRequest(model=model, options=options,
                                sequences=[_sequence(x, label) for x, label in zip(items, labels, strict=True)])
    return request, single
