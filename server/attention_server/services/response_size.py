"""The largest response a call may get (max_response_bytes): a transport limit,
checked before anything is computed, from the runtime's estimate of each result."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import TooLarge
from ..runtime.types import Plan

ADVICE = "ask for FLOAT16, fewer layers/heads, or top_k only"


class ResponseSize:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def check(self, size: int, what: str = "response", advice: str = ADVICE) -> None:
        """ResourceExhausted when `size` bytes are over the limit."""
        if size > self.max_bytes:
            raise TooLarge(
                f"{what} would be about {size / 2**20:.1f} MiB, over the {self.max_bytes / 2**20:.0f} MiB limit "
                f"(max_response_bytes); {advice}")

    def unary(self, plan: Plan, factor: float = 1.0) -> int:
        """The estimated size of a unary response to `plan` (checked as `factor` times
        that: a transport's encoding may be larger than protobuf's)."""
        indices = range(len(plan.tokens))
        size = sum(plan.sequence_bytes(i) for i in indices)
        self.check(int(size * factor), advice=f"use AnalyzeStream, {_advice(plan, indices, factor)}")
        return size

    def streamed(self, plan: Plan) -> None:
        """Each streamed message (one sequence's result) must be within the limit."""
        largest = max(range(len(plan.tokens)), key=plan.sequence_bytes)
        self.check(plan.sequence_bytes(largest), "one result", _advice(plan, [largest]))


def _advice(plan: Plan, indices: Iterable[int], factor: float = 1.0) -> str:
    """ADVICE, after what the optional outputs take of the response when they were asked for
    (they can be the bulk of it: query_key on 512 tokens is 2 x 4.7 MiB a layer)."""
    indices = list(indices)
    shares = [(name, sum(bytes_of(i) for i in indices) * factor, remedy) for name, bytes_of, remedy in (
        ("options.query_key", plan.query_key_bytes, "ask for fewer layers/heads or leave it out"),
        ("options.hidden_states_layers", plan.hidden_states_layers_bytes, "list fewer layers or leave it out"))]
    named = [f"{name} takes {size / 2**20:.1f} MiB of it ({remedy})" for name, size, remedy in shares if size]
    if not named:
        return ADVICE
    return f"{'; '.join(named)}; or {ADVICE}"
