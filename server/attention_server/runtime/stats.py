"""Per-model counters and durations (KServe ModelStatistics and metrics read them)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    """How many times something happened and the nanoseconds it took in all."""

    count: int = 0
    ns: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, ns: int, count: int = 1) -> None:
        with self._lock:
            self.count += count
            self.ns += ns


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class BatcherStats:
    """Counters since the model was loaded."""

    batches: int = 0
    wide_batches: int = 0
    sequences: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    expired: int = 0
    cancelled: int = 0
    rejected: int = 0
    last_inference_ms: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    # Calls (one per request), sequences' waits, and runtime batches' phases.
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    by_batch_size: dict[int, BatchDurations] = field(default_factory=dict)

    def batch(self, size: int) -> BatchDurations:
        entry = self.by_batch_size.get(size)
        if entry is None:
            entry = self.by_batch_size.setdefault(size, BatchDurations())
        return entry

    def ran(self) -> None:
        self.last_inference_ms = int(time.time() * 1000)


class BatchObserver:
    """Hooks the batcher calls from its threads (metrics implement them)."""

    def queued(self, model: str, seconds: float) -> None:
        """A sequence waited `seconds` for its runtime batch."""

    def ran(self, model: str, size: int, tokens: int, input_seconds: float, infer_seconds: float) -> None:
        """A runtime batch of `size` sequences ran."""

    def delivered(self, model: str, seconds: float) -> None:
        """A batch was cut and encoded in `seconds`."""
