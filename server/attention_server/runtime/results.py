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
    meta = plan.model.metadata
    needed.update(meta.hidden_states_outputs[layer] for layer in options.hidden_states_layers)
    if options.query_key:
        needed.update(meta.query_outputs[layer] for layer in plan.layers)
        needed.update(meta.key_outputs[layer] for layer in plan.layers)
    return needed


def _per_layer(values: dict[str, np.ndarray], names: list[str], row: int, n: int,
               heads: list[int] | None = None) -> np.ndarray:
    """One sequence's slice of per-layer outputs, stacked on a new first axis: [len(names), ...].
    Hidden states are [batch, seq, hidden]; queries and keys [batch, heads, seq, head_dim]."""
    first = values[names[0]]
    if heads is None:
        out = np.empty((len(names), n, *first.shape[2:]), dtype=np.float32)
        for k, name in enumerate(names):
            out[k] = values[name][row, :n]
    else:
        out = np.empty((len(names), len(heads), n, *first.shape[3:]), dtype=np.float32)
        for k, name in enumerate(names):
            out[k] = values[name][row, heads, :n]
    return out


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
        out.pairs = top_pairs(att, plan.layers, plan.heads, options.top_k, options.min_strength, exclude,
                              causal=plan.model.metadata.causal)
    if options.word_level or options.head_statistics:
        att = _select(values[ATTENTIONS][row, :, :, :n, :n], plan)
        meta = plan.model.metadata
        if options.word_level:
            words = heads.group_words(tokens, meta.continuing_subword_prefix, meta.word_start_prefix)
            word_att = heads.word_attention(att, words)
            out.words = words
            if options.attention:
                out.word_attention = word_att.astype(np.float16 if options.attention_dtype == FLOAT16 else np.float32)
            if options.top_k is not None:
                exclude = words.special if options.exclude_special_tokens else None
                out.word_pairs = top_pairs(word_att, plan.layers, plan.heads, options.top_k, options.min_strength,
                                           exclude, causal=meta.causal)
        if options.head_statistics:
            special = meta.special_tokens
            out.head_statistics = heads.head_statistics(att, tokens, special.get("cls", {}).get("id"),
                                                        special.get("sep", {}).get("id"), causal=meta.causal)
    if options.rollout is not None:
        out.rollout = heads.rollout(values[ATTENTIONS][row, :, :, :n, :n], options.rollout)
    meta = plan.model.metadata
    if options.hidden_states_layers:
        out.hidden_states_layers = list(options.hidden_states_layers)
        out.layer_hidden_states = _per_layer(values, [meta.hidden_states_outputs[k] for k in
                                                      options.hidden_states_layers], row, n)
    if options.query_key:
        out.queries = _per_layer(values, [meta.query_outputs[k] for k in plan.layers], row, n, plan.heads)
        out.keys = _per_layer(values, [meta.key_outputs[k] for k in plan.layers], row, n, plan.heads)
    return out
