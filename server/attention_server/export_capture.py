"""The module attention-export traces: a Hugging Face model in eager attention, returning
its per-head softmax attention, the hidden states at every layer boundary and the
query/key vectors each layer's attention logits are made of.

Build-time tooling (torch, transformers); the server never imports this module.

Query and key vectors are caught where the model hands them to its attention
function: transformers routes every attention through `AttentionInterface`, so an
implementation registered under RECORDING ("eager" plus a note of the query and key
it was given) sees the query after any rotary embedding and the keys as they meet
the query. For grouped-query attention the key and value heads are expanded to the
query heads here, once (as the model's own `repeat_kv` does), and the model's eager
function then runs with one query head per key head: the graph computes the
expansion once, and keys[:, h] pairs with query head h.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any

RECORDING = "attention_export_recording"
_state = threading.local()


def _recording_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                         scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> Any:
    """The model's own eager attention, noting (query, key expanded to the query heads, scaling)."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:
        batch, kv_heads, length, dim = key.shape
        key = key[:, :, None].expand(batch, kv_heads, groups, length, dim).reshape(batch, -1, length, dim)
        value = value[:, :, None].expand(batch, kv_heads, groups, length, dim).reshape(batch, -1, length,
                                                                                     value.shape[-1])
        module = types.SimpleNamespace(num_key_value_groups=1, training=module.training)
    records = getattr(_state, "records", None)
    if records is not None:
        records.append((query, key, query.size(-1) ** -0.5 if scaling is None else float(scaling)))
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register() -> None:
    """Make RECORDING an attention implementation (its masks are the eager ones)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(RECORDING, _recording_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(RECORDING, eager_mask)


def build(model: Any, with_token_types: bool) -> Any:
    """Wrap `model` (loaded with eager attention) so that it returns, in this order:
    last_hidden_state, attentions stacked [batch, layers, heads, seq, seq], the hidden
    states (embeddings first; the last one only when it is not last_hidden_state itself),
    then per layer the queries, then per layer the keys, [batch, heads, seq, head_dim].
    `wrapper.layout(sample)` says which hidden states are distinct and each layer's scaling."""
    import inspect

    import torch

    register()
    model.set_attn_implementation(RECORDING)
    accepts = inspect.signature(model.forward).parameters
    extra = {"use_cache": False} if "use_cache" in accepts else {}

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.last_is_own = False  # hidden_states[-1] is a tensor of its own (set by layout)

        def _run(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> tuple[Any, list[Any]]:
            kwargs = {"token_type_ids": token_type_ids} if with_token_types else {}
            _state.records = []
            try:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True,
                                 output_hidden_states=True, return_dict=True, **kwargs, **extra)
                return out, _state.records
            finally:
                _state.records = None

        def layout(self, *sample: Any) -> dict[str, Any]:
            out, records = self._run(*sample, *([None] * (3 - len(sample))))
            self.last_is_own = out.hidden_states[-1] is not out.last_hidden_state
            if len(records) != len(out.attentions):
                raise SystemExit(f"export failed: {len(records)} attention calls recorded for "
                                 f"{len(out.attentions)} layers")
            return {"hidden_states": len(out.hidden_states), "last_is_own": self.last_is_own,
                    "scaling": [r[2] for r in records], "head_dim": int(records[0][0].shape[-1])}

        def forward(self, input_ids, attention_mask, token_type_ids=None):  # type: ignore[no-untyped-def]
            out, records = self._run(input_ids, attention_mask, token_type_ids)
            hidden = list(out.hidden_states if self.last_is_own else out.hidden_states[:-1])
            return (out.last_hidden_state, torch.stack(out.attentions, dim=1), *hidden,
                    *(r[0] for r in records), *(r[1] for r in records))

    return Wrapper().eval()
