"""Cutting one sequence's result out of a padded runtime batch."""

from __future__ import annotations

import numpy as np

from . import heads
from .pairs import top_pairs
from .types import FLOAT16, Plan, SequenceOutput

HIDDEN = "last_hidden_state"
ATTENTIONS = "attentions"
ATTENTIONS_FP16 = "attentions_fp16"


def outputs_for(plan: Plan) -> set[str]:
    """The graph outputs one request needs."""
    options = plan.options
    needed = set()
    if options.hidden_states:
        needed.add(HIDDEN)
    analysis = options.word_level or options.head_statistics or options.rollout is not None
    if options.top_k is not None or analysis or (options.attention and options.attention_dtype != FLOAT16):
        needed.add(ATTENTIONS)
    if options.attention and options.attention_dtype == FLOAT16:
        needed.add(ATTENTIONS_FP16)
    return needed


def _select(att: np.ndarray, plan: Plan) -> np.ndarray:
    meta = plan.model.metadata
    if plan.layers != list(range(meta.num_layers)):
        att = att[plan.layers]
    if plan.heads != list(range(meta.num_heads)):
        att = att[:, plan.heads]
    return att


def cut(plan: Plan, index: int, row: int, values: dict[str, np.ndarray]) -> SequenceOutput:
    """Sequence `index` of the plan, found at `row` of the batch outputs, cut to its
    own length and to the asked layers/heads (one copy per returned array)."""
    options, tokens = plan.options, plan.tokens[index]
    n = len(tokens)
    out = SequenceOutput(index=index, id=plan.inputs[index].id, tokens=tokens, layers=plan.layers, heads=plan.heads)
    if options.hidden_states:
        out.hidden_states = np.ascontiguousarray(values[HIDDEN][row, :n])
    if options.attention:
        name = ATTENTIONS_FP16 if options.attention_dtype == FLOAT16 else ATTENTIONS
        out.attention = np.ascontiguousarray(_select(values[name][row, :, :, :n, :n], plan))
    if options.top_k is not None:
        att = _select(values[ATTENTIONS][row, :, :, :n, :n], plan)
        exclude = tokens.special if options.exclude_special_tokens else None
        out.pairs = top_pairs(att, plan.layers, plan.heads, options.top_k, options.min_strength, exclude)
    if options.word_level or options.head_statistics:
        att = _select(values[ATTENTIONS][row, :, :, :n, :n], plan)
        meta = plan.model.metadata
        if options.word_level:
            words = heads.group_words(tokens, meta.continuing_subword_prefix)
            word_att = heads.word_attention(att, words)
            out.words = words
            if options.attention:
                out.word_attention = word_att.astype(np.float16 if options.attention_dtype == FLOAT16 else np.float32)
            if options.top_k is not None:
                exclude = words.special if options.exclude_special_tokens else None
                out.word_pairs = top_pairs(word_att, plan.layers, plan.heads, options.top_k, options.min_strength,
                                           exclude)
        if options.head_statistics:
            special = meta.special_tokens
            out.head_statistics = heads.head_statistics(att, tokens, special.get("cls", {}).get("id"),
                                                        special.get("sep", {}).get("id"))
    if options.rollout is not None:
        out.rollout = heads.rollout(values[ATTENTIONS][row, :, :, :n, :n], options.rollout)
    return out
