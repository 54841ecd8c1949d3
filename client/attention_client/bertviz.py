"""A result as the arguments of bertviz's `head_view` and `model_view`.

    from bertviz import head_view, model_view
    result = client.analyze("The cat sat on the mat.", text_pair="It slept.")
    head_view(*result.to_bertviz())          # (attention, tokens, sentence_b_start)
    model_view(*result.to_bertviz(), display_mode="light")

bertviz 1.4.1 stacks the layers with `torch.stack` and reads the head count with
`Tensor.size(0)`, so it takes torch tensors only: `framework="torch"` (the default)
gives them, as views of the result's numpy array (no copy). torch is imported only
then; the SDK does not depend on it. `framework="numpy"` gives the same shapes as
numpy arrays, for other tools.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, Literal, NamedTuple, TypeVar, overload

import numpy as np

from .errors import InvalidArgumentError
from .results import AnalyzeResult, FloatArray

if TYPE_CHECKING:
    import torch

Framework = Literal["torch", "numpy"]
T = TypeVar("T")


class BertvizInput(NamedTuple, Generic[T]):
    """bertviz's first three parameters, in their order: call `head_view(*x)` or `model_view(*x)`."""

    attention: tuple[T, ...]
    """One [1, heads, seq, seq] array per layer, layer 0 first (bertviz's batch of one)."""
    tokens: list[str]
    """The tokens as the model's tokenizer spells them (`convert_ids_to_tokens`: "##er", "Ġcat");
    bertviz's `prettify_tokens` turns "Ġ"/"▁" into spaces itself."""
    sentence_b_start: int | None
    """Index of the first token of the pair's second text (segment 1); None for one text,
    which is bertviz's own default."""


@overload
def to_bertviz(result: AnalyzeResult, framework: Literal["torch"] = "torch") -> BertvizInput[torch.Tensor]: ...


@overload
def to_bertviz(result: AnalyzeResult, framework: Literal["numpy"]) -> BertvizInput[FloatArray]: ...


def to_bertviz(result: AnalyzeResult, framework: Framework = "torch") -> BertvizInput[torch.Tensor] | \
        BertvizInput[FloatArray]:
    """`result` as (attention, tokens, sentence_b_start) for bertviz.

    The result must hold the attention of layers 0..L-1 and heads 0..H-1 (all of them,
    as `analyze` returns by default, or a leading run): bertviz numbers layers and heads
    by position, so any other subset would be drawn under wrong numbers and raises
    InvalidArgumentError instead. float16 attention comes out as float32."""
    attention = result.attention
    if attention is None:
        raise InvalidArgumentError("attention: not in this result; bertviz needs the matrices "
                                   "(analyze with attention=True)")
    for name, got in (("layers", result.layers), ("heads", result.heads)):
        if got != list(range(len(got))):
            raise InvalidArgumentError(
                f"{name}: this result has {name} {got}; bertviz numbers {name} by position and needs "
                f"0..n-1 (analyze without `{name}=`, or with {name}=range(n))")
    layers = attention.astype(np.float32, copy=False)[:, None]  # [L, 1, H, S, S]
    segments = [t.segment for t in result.tokens]
    start = segments.index(1) if 1 in segments else None
    tokens = result.token_texts
    if framework == "numpy":
        return BertvizInput(tuple(layers), tokens, start)
    if framework != "torch":
        raise InvalidArgumentError(f"framework: {framework!r} is not 'torch' or 'numpy'")
    try:
        import torch
    except ImportError as exc:
        raise ImportError("to_bertviz() gives torch tensors, as bertviz needs: install torch "
                          "(bertviz depends on it), or ask framework='numpy'") from exc
    return BertvizInput(tuple(torch.from_numpy(layer) for layer in layers), tokens, start)
