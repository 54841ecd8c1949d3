"""Per-model counters and durations (KServe ModelStatistics and metrics read them)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

# The most recent runtime batch sizes kept in BatcherStats.batch_sizes.
BATCH_SIZES_KEPT = 10000


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
    """Counters since the model was loaded. The compute threads and the event loop
    update them side by side: every update goes through a method that holds the
    lock; readers read the attributes."""

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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def batch(self, size: int) -> BatchDurations:
        with self._lock:
            entry = self.by_batch_size.get(size)
            if entry is None:
                entry = self.by_batch_size[size] = BatchDurations()
            return entry

    def started(self, sequences: int, tokens: int, padded_tokens: int, wide: bool) -> None:
        """A runtime batch starts (compute thread)."""
        with self._lock:
            self.batches += 1
            self.wide_batches += wide
            self.sequences += sequences
            self.tokens += tokens
            self.padded_tokens += padded_tokens
            self.batch_sizes.append(sequences)
            if len(self.batch_sizes) > BATCH_SIZES_KEPT:
                del self.batch_sizes[:BATCH_SIZES_KEPT // 2]

    def ran(self) -> None:
        with self._lock:
            self.last_inference_ms = int(time.time() * 1000)

    def left_queue(self, expired: int = 0, cancelled: int = 0) -> None:
        """Sequences left the queue without computing: their deadline passed, or their call ended."""
        with self._lock:
            self.expired += expired
            self.cancelled += cancelled

    def refused(self) -> None:
        """A submission did not fit in the queue."""
        with self._lock:
            self.rejected += 1


class BatchObserver:
    """Hooks the batcher calls from its threads (metrics implement them)."""

    def queued(self, model: str, seconds: float) -> None:
        """A sequence waited `seconds` for its runtime batch."""

    def ran(self, model: str, size: int, tokens: int, input_seconds: float, infer_seconds: float) -> None:
        """A runtime batch of `size` sequences ran."""

    def delivered(self, model: str, seconds: float) -> None:
        """A batch was cut and encoded in `seconds`."""
