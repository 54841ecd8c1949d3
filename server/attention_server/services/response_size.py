"""The largest response a call may get (max_response_bytes): a transport limit,
checked before anything is computed, from the runtime's estimate of each result."""

from __future__ import annotations

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
        size = sum(plan.sequence_bytes(i) for i in range(len(plan.tokens)))
        self.check(int(size * factor), advice=f"use AnalyzeStream, {ADVICE}")
        return size

    def streamed(self, plan: Plan) -> None:
        """Each streamed message (one sequence's result) must be within the limit."""
        self.check(max(plan.sequence_bytes(i) for i in range(len(plan.tokens))), "one result")
