"""Benchmark inputs: texts of exact token lengths, and the request options of
each workload. Shared by the load generator and the in-process baselines."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "repository" / "minilm-l6"


@functools.cache
def _words() -> list[str]:
    """Lowercase alphabetic vocabulary entries that tokenize to exactly one token."""
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    vocab = tok.get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and w.isascii() and 3 <= len(w) <= 9)
    return [w for w in words[::7]][:4000]


def text_of_length(tokens: int, seed: int) -> str:
    """A text that tokenizes to exactly `tokens` tokens ([CLS] and [SEP] included)."""
    rng = np.random.default_rng(seed)
    words = _words()
    return " ".join(words[i] for i in rng.integers(0, len(words), tokens - 2))


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    lengths: tuple[int, ...]  # token lengths cycled through, one sequence per request
    options: dict[str, Any] = field(default_factory=dict)

    def texts(self, count: int, seed: int = 0) -> list[str]:
        return [text_of_length(self.lengths[i % len(self.lengths)], seed * 100003 + i) for i in range(count)]

    @property
    def outputs(self) -> list[str]:
        """The graph outputs the service computes for it (for the ORT baseline)."""
        out = []
        if self.options.get("hidden_states", True):
            out.append("last_hidden_state")
        if self.options.get("attention", True) or "top_k" in self.options:
            out.append("attentions")
        return out


SHORT = Workload("short", "one 16-token sentence per request, top-5 pairs per head", (16,),
                 {"top_k": 5, "attention": False, "hidden_states": False})
HEAVY = Workload("heavy", "one 128-token sequence per request, full float32 attention and hidden states", (128,),
                 {"attention": True, "hidden_states": True})
MIXED = Workload("mixed", "one sequence of 8-256 tokens per request, top-5 pairs and hidden states",
                 tuple(int(x) for x in np.random.default_rng(7).integers(8, 257, 64)),
                 {"top_k": 5, "attention": False, "hidden_states": True})
# The Open Inference Protocol's small case: enough numbers that JSON outputs show their cost.
SMALL = Workload("small", "one 16-token sentence per request, full float32 attention and hidden states", (16,),
                 {"attention": True, "hidden_states": True})
# Capacity (bench.capacity): 128 tokens without the matrices in the reply.
PAIRS128 = Workload("pairs128", "one 128-token sequence per request, top-5 pairs per head", (128,),
                    {"top_k": 5, "attention": False, "hidden_states": False})
WORKLOADS = {w.name: w for w in (SHORT, HEAVY, MIXED, SMALL, PAIRS128)}
