"""The engine: validates and tokenizes requests, plans runtime batches, runs the
model off the event loop and cuts every result back to its own sequence.

Transport-neutral: the gRPC layer hands it SequenceInput/AnalyzeOptions and
gets SequenceOutput back; errors are domain errors (errors.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgument, ResourceExhausted
from .onnx_model import pad_batch
from .pairs import top_pairs
from .repository import LoadedModel, ModelRepository
from .types import FLOAT16, FLOAT32, AnalyzeOptions, SequenceInput, SequenceOutput, Tokens

log = logging.getLogger(__name__)

HIDDEN = "last_hidden_state"
ATTENTIONS = "attentions"
# Rough protobuf cost of one Token (fields, tags, short text) and one PairStrength.
TOKEN_BYTES = 40
PAIR_BYTES = 16


@dataclass(frozen=True)
class Limits:
    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    max_response_bytes: int = 256 << 20


@dataclass(frozen=True)
class Plan:
    """A validated request: its model, tokens, resolved layers/heads and outputs."""

    model: LoadedModel
    inputs: list[SequenceInput]
    tokens: list[Tokens]
    options: AnalyzeOptions
    layers: list[int]
    heads: list[int]
    outputs: list[str]

    def sequence_bytes(self, index: int) -> int:
        """Upper estimate of one sequence's serialized result size."""
        n = len(self.tokens[index])
        size = n * TOKEN_BYTES + 256
        cells = len(self.layers) * len(self.heads) * n * n
        if self.options.attention:
            size += cells * (2 if self.options.attention_dtype == FLOAT16 else 4)
        if self.options.hidden_states:
            size += n * self.model.metadata.hidden_size * 4
        if self.options.top_k is not None:
            size += len(self.layers) * len(self.heads) * (min(self.options.top_k, n * n) * PAIR_BYTES + 16)
        return size


def _check_indices(field: str, values: Sequence[int], limit: int, what: str, model: str) -> list[int]:
    if not values:
        return list(range(limit))
    seen: set[int] = set()
    for k, v in enumerate(values):
        if not 0 <= v < limit:
            raise InvalidArgument(f"{field}[{k}]", f"{what} {v} is out of range [0, {limit}) for model {model!r}")
        if v in seen:
            raise InvalidArgument(f"{field}[{k}]", f"{what} {v} is listed twice")
        seen.add(v)
    return list(values)


class Engine:
    """Runs analysis requests against the models of a repository."""

    def __init__(self, repository: ModelRepository, limits: Limits) -> None:
        self.repository = repository
        self.limits = limits
        # One worker: ONNX Runtime already uses every core for one run.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- validation ---------------------------------------------------------------

    def plan(self, model_name: str, inputs: list[SequenceInput], options: AnalyzeOptions) -> Plan:
        """Validate a request and tokenize it; raises InvalidArgument / ModelNotFound."""
        model = self.repository.get(model_name)
        meta = model.metadata
        if not inputs:
            raise InvalidArgument("sequences", f"empty batch; send 1 to {self.limits.max_batch_size} sequences")
        if len(inputs) > self.limits.max_batch_size:
            raise InvalidArgument(
                "sequences", f"{len(inputs)} sequences exceed the limit of {self.limits.max_batch_size} per request"
            )
        layers = _check_indices("options.layers", options.layers, meta.num_layers, "layer", meta.name)
        heads = _check_indices("options.heads", options.heads, meta.num_heads, "head", meta.name)
        if options.attention_dtype not in (FLOAT32, FLOAT16):
            raise InvalidArgument("options.attention_dtype", f"{options.attention_dtype} is not supported; "
                                  "use FLOAT32 or FLOAT16")
        if options.top_k is not None and options.top_k <= 0:
            raise InvalidArgument("options.top_k", f"must be > 0 when set, got {options.top_k}")
        if not (0.0 <= options.min_strength <= 1.0) or math.isnan(options.min_strength):
            raise InvalidArgument("options.min_strength", f"must be within [0, 1], got {options.min_strength}")
        tokens = [self._tokenize(model, i, seq) for i, seq in enumerate(inputs)]
        outputs = []
        if options.hidden_states:
            outputs.append(HIDDEN)
        if options.attention or options.top_k is not None:
            outputs.append(ATTENTIONS)
        return Plan(model, inputs, tokens, options, layers, heads, outputs)

    def _tokenize(self, model: LoadedModel, i: int, seq: SequenceInput) -> Tokens:
        meta = model.metadata
        field = f"sequences[{i}]"
        if seq.token_ids is not None:
            if seq.text_pair:
                raise InvalidArgument(f"{field}.text_pair", "only allowed with text input, not token_ids")
            ids = np.asarray(seq.token_ids, dtype=np.int64)
            if ids.size == 0:
                raise InvalidArgument(f"{field}.token_ids.ids", "empty sequence; give at least one token id")
            bad = np.flatnonzero((ids < 0) | (ids >= meta.vocab_size))
            if bad.size:
                j = int(bad[0])
                raise InvalidArgument(f"{field}.token_ids.ids[{j}]",
                                      f"token id {int(ids[j])} is outside the vocabulary [0, {meta.vocab_size})")
            types = np.zeros_like(ids) if not seq.type_ids else np.asarray(seq.type_ids, dtype=np.int64)
            if types.shape != ids.shape:
                raise InvalidArgument(f"{field}.token_ids.type_ids",
                                      f"has {types.size} entries; must be empty or match the {ids.size} ids")
            bad = np.flatnonzero((types < 0) | (types >= max(meta.type_vocab_size, 1)))
            if bad.size:
                j = int(bad[0])
                raise InvalidArgument(f"{field}.token_ids.type_ids[{j}]", f"type id {int(types[j])} is outside "
                                      f"[0, {meta.type_vocab_size})")
            tokens = model.tokenizer.from_ids(ids, types)
            where = f"{field}.token_ids.ids"
        else:
            if not seq.text or not seq.text.strip():
                raise InvalidArgument(f"{field}.text", "empty sequence; give non-blank text or token_ids")
            tokens = model.tokenizer.encode(seq.text, seq.text_pair or None)
            where = f"{field}.text"
        if len(tokens) > meta.max_positions:
            raise InvalidArgument(
                where,
                f"{len(tokens)} tokens (special tokens included) exceed the model's {meta.max_positions} "
                f"positions; nothing is truncated, split the input",
            )
        return tokens

    # -- execution ------------------------------------------------------------------

    def _batches(self, plan: Plan, by_length: bool) -> list[list[int]]:
        """Sequence indices grouped into runtime batches of at most max_batch_tokens
        padded tokens; sorted by length first (less padding) unless results must
        flow in request order."""
        order = list(range(len(plan.tokens)))
        if by_length:
            order.sort(key=lambda i: len(plan.tokens[i]))
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i in order:
            n = len(plan.tokens[i])
            if current and (len(current) + 1) * max(longest, n) > self.limits.max_batch_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, n)
        if current:
            batches.append(current)
        return batches

    def _compute(self, plan: Plan, indices: list[int]) -> list[SequenceOutput]:
        """Run one runtime batch and cut it per sequence (runs in the worker thread)."""
        tokens = [plan.tokens[i] for i in indices]
        values = {}
        if plan.outputs:
            feed = pad_batch(tokens, plan.model.metadata.pad_token_id)
            values = plan.model.runtime.run(feed, plan.outputs)
        return [self._cut(plan, row, i, values) for row, i in enumerate(indices)]

    def _cut(self, plan: Plan, row: int, index: int, values: dict[str, np.ndarray]) -> SequenceOutput:
        options, tokens = plan.options, plan.tokens[index]
        n = len(tokens)
        out = SequenceOutput(index=index, id=plan.inputs[index].id, tokens=tokens,
                             layers=plan.layers, heads=plan.heads)
        if HIDDEN in values:
            out.hidden_states = np.ascontiguousarray(values[HIDDEN][row, :n])
        if ATTENTIONS in values:
            meta = plan.model.metadata
            att = values[ATTENTIONS][row, :, :, :n, :n]
            if plan.layers != list(range(meta.num_layers)):
                att = att[plan.layers]
            if plan.heads != list(range(meta.num_heads)):
                att = att[:, plan.heads]
            if options.attention:
                dtype = np.float16 if options.attention_dtype == FLOAT16 else np.float32
                out.attention = np.ascontiguousarray(att, dtype=dtype)
            if options.top_k is not None:
                exclude = tokens.special if options.exclude_special_tokens else None
                out.pairs = top_pairs(att, plan.layers, plan.heads, options.top_k, options.min_strength, exclude)
        return out

    async def analyze(self, plan: Plan) -> list[SequenceOutput]:
        """All results of a plan, in request order, for one unary response."""
        total = sum(plan.sequence_bytes(i) for i in range(len(plan.tokens)))
        if total > self.limits.max_response_bytes:
            raise ResourceExhausted(
                f"response would be about {total / 2**20:.1f} MiB, over the "
                f"{self.limits.max_response_bytes / 2**20:.0f} MiB limit "
                "(max_response_bytes); use AnalyzeStream, FLOAT16, fewer layers/heads, or top_k only"
            )
        results: list[SequenceOutput | None] = [None] * len(plan.tokens)
        loop = asyncio.get_running_loop()
        for indices in self._batches(plan, by_length=True):
            for out in await loop.run_in_executor(self._executor, self._compute, plan, indices):
                results[out.index] = out
        return [r for r in results if r is not None]

    async def analyze_stream(self, plan: Plan) -> AsyncIterator[SequenceOutput]:
        """Results one by one in request order, each as soon as it and all before it are ready."""
        biggest = max(plan.sequence_bytes(i) for i in range(len(plan.tokens)))
        if biggest > self.limits.max_response_bytes:
            raise ResourceExhausted(
                f"one result would be about {biggest / 2**20:.1f} MiB, over the "
                f"{self.limits.max_response_bytes / 2**20:.0f} MiB message limit (max_response_bytes)"
            )
        ready: dict[int, SequenceOutput] = {}
        next_index = 0
        loop = asyncio.get_running_loop()
        for indices in self._batches(plan, by_length=False):
            for out in await loop.run_in_executor(self._executor, self._compute, plan, indices):
                ready[out.index] = out
            while next_index in ready:
                yield ready.pop(next_index)
                next_index += 1
