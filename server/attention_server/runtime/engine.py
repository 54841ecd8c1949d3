"""The engine: validates and tokenizes requests and hands their sequences to the
model's dynamic batcher, which runs them off the event loop and cuts every
result back to its own sequence.

Transport-neutral: the gRPC layer hands it SequenceInput/AnalyzeOptions and
gets SequenceOutput back; errors are domain errors (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..errors import FieldPath, InvalidArgument, Unavailable
from .batcher import BatchConfig, Batcher, Into, Job, TraceHooks
from .budget import Lease, ResultBudget
from .heads import FUSIONS
from .repository import ModelRepository, check_model_name
from .stats import BatcherStats, BatchObserver
from .types import (
    FLOAT16,
    FLOAT32,
    AnalyzeOptions,
    LoadedModel,
    ModelMetadata,
    Plan,
    SequenceInput,
    SequenceOutput,
    Tokens,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
# Requests with more characters (or ids) than this are validated and tokenized off the event loop.
INLINE_PLAN_CHARS = 16384
# Texts longer than this many characters per position are first tokenized in a
# prefix of that size: a prefix already over the limit stops there.
PROBE_CHARS_PER_TOKEN = 8
# A prefix cut inside a word may tokenize that word into a few more pieces than the whole text does.
PROBE_MARGIN = 4
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


@dataclass(frozen=True)
class Limits:
    """Per-request limits (runtime batches have their own, in BatchConfig)."""

    max_batch_size: int = 64
    max_chars_per_token: int = 32
    """A text may have at most this many characters per model position (checked before tokenizing)."""
    stream_window_bytes: int = 64 << 20
    """Results of one streaming call computed ahead of what its caller has read (at least one)."""


def _check_indices(field: FieldPath, values: Sequence[int], limit: int, what: str, model: str,
                   numbering: str = "") -> list[int]:
    """`values` (all of [0, limit) when empty): at most `limit` of them, each in range, none twice.
    `numbering` explains the indices in the messages."""
    if not values:
        return list(range(limit))
    if len(values) > limit:
        raise InvalidArgument(field, f"lists {len(values)} {what}s; model {model!r} has {limit}{numbering}")
    seen: set[int] = set()
    for k, v in enumerate(values):
        if not 0 <= v < limit:
            raise InvalidArgument((*field, k), f"{what} {v} is out of range [0, {limit}) for model "
                                  f"{model!r}{numbering}")
        if v in seen:
            raise InvalidArgument((*field, k), f"{what} {v} is listed twice")
        seen.add(v)
    return list(values)


def _check_extra_outputs(meta: ModelMetadata, options: AnalyzeOptions) -> None:
    """hidden_states_layers and query_key: in range, and the model exported with those outputs."""
    reexport = "re-export it with this version's attention-export (docs/models.md)"
    if options.hidden_states_layers:
        field: FieldPath = ("options", "hidden_states_layers")
        if not meta.hidden_states_outputs:
            raise InvalidArgument(field, f"model {meta.name!r} was exported without per-layer hidden states; "
                                  f"{reexport}")
        _check_indices(field, options.hidden_states_layers, meta.num_layers + 1, "layer", meta.name,
                       f" (0: embeddings .. {meta.num_layers}: last layer)")
    if options.query_key and not meta.query_outputs:
        raise InvalidArgument(("options", "query_key"), f"model {meta.name!r} was exported without query/key "
                              f"outputs; {reexport}")


class Engine:
    """Runs analysis requests against the models of a repository, one dynamic
    batcher per model."""

    def __init__(self, repository: ModelRepository, limits: Limits, batch_config: BatchConfig | None = None,
                 observer: BatchObserver | None = None, budget: ResultBudget | None = None,
                 trace: TraceHooks | None = None) -> None:
        self.repository = repository
        self.observer = observer
        self.trace = trace
        self.limits = limits
        self.batch_config = batch_config or BatchConfig(max_batch_size=limits.max_batch_size)
        self._batchers: dict[str, Batcher] = {}
        self._accepting = True
        self.budget = budget or ResultBudget(1 << 30, 30.0)
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        self._closing: set[asyncio.Task[None]] = set()  # batchers of replaced models, draining

    # -- validation ---------------------------------------------------------------

    def plan(self, model_name: str, inputs: list[SequenceInput], options: AnalyzeOptions) -> Plan:
        """Validate a request and tokenize it; raises InvalidArgument / ModelNotFound."""
        if not self._accepting:
            raise Unavailable("server is shutting down; retry on another instance")
        model = self.repository.get(model_name)
        meta = model.metadata
        if not inputs:
            raise InvalidArgument(("sequences",), f"empty batch; send 1 to {self.limits.max_batch_size} sequences")
        if len(inputs) > self.limits.max_batch_size:
            raise InvalidArgument(
                "sequences", f"{len(inputs)} sequences exceed the limit of {self.limits.max_batch_size} per request"
            )
        layers = _check_indices(("options", "layers"), options.layers, meta.num_layers, "layer", meta.name)
        heads = _check_indices(("options", "heads"), options.heads, meta.num_heads, "head", meta.name)
        if options.attention_dtype not in (FLOAT32, FLOAT16):
            raise InvalidArgument(("options", "attention_dtype"), f"{options.attention_dtype} is not supported; "
                                  "use FLOAT32 or FLOAT16")
        max_pairs = meta.max_positions ** 2
        if options.top_k is not None and not 0 < options.top_k <= max_pairs:
            raise InvalidArgument(("options", "top_k"), f"must be within [1, {max_pairs}] (all pairs of "
                                  f"{meta.max_positions} positions) when set, got {options.top_k}")
        if options.rollout is not None and options.rollout not in FUSIONS:
            raise InvalidArgument(("options", "rollout"), f"{options.rollout!r} is not a fusion; use mean, max or min")
        if not (0.0 <= options.min_strength <= 1.0) or math.isnan(options.min_strength):
            raise InvalidArgument(("options", "min_strength"), f"must be within [0, 1], got {options.min_strength}")
        _check_extra_outputs(meta, options)
        for i, seq in enumerate(inputs):
            self._check_bounds(model, i, seq)
        tokens = [self._tokenize(model, i, seq) for i, seq in enumerate(inputs)]
        return Plan(model, inputs, tokens, options, layers, heads)

    def max_text_chars(self, model: LoadedModel) -> int:
        return model.metadata.max_positions * self.limits.max_chars_per_token

    def _check_bounds(self, model: LoadedModel, i: int, seq: SequenceInput) -> None:
        """Cheap limits, before anything is tokenized or copied: id counts against
        the model's positions, text length against what those positions can take."""
        meta = model.metadata
        field: FieldPath = ("sequences", i)
        if seq.token_ids is not None:
            n = len(seq.token_ids)
            if n > meta.max_positions:
                raise InvalidArgument((*field, "token_ids", "ids"), f"{n} token ids exceed the model's "
                                      f"{meta.max_positions} positions; nothing is truncated, split the input")
            if seq.type_ids is not None and len(seq.type_ids) > meta.max_positions:
                raise InvalidArgument((*field, "token_ids", "type_ids"), f"has {len(seq.type_ids)} entries; must be "
                                      f"empty or match the {n} ids")
            return
        limit = self.max_text_chars(model)
        for name, text in (("text", seq.text), ("text_pair", seq.text_pair)):
            if text is not None and len(text) > limit:
                raise InvalidArgument((*field, name), f"{len(text)} characters exceed the limit of {limit} "
                                      f"({self.limits.max_chars_per_token} per position of the model's "
                                      f"{meta.max_positions}); split the input")

    async def plan_async(self, model_name: str, inputs: list[SequenceInput], options: AnalyzeOptions) -> Plan:
        """`plan`, in a worker thread when there is much to tokenize (a 64 x 512-token
        batch takes ~20 ms: too long to hold the event loop). Traced as `tokenize`."""
        size = sum(len(s.text or "") + len(s.text_pair or "") + (0 if s.token_ids is None else len(s.token_ids))
                   for s in inputs)
        with self.span("tokenize") as span:
            if span is not None:
                span.set_attribute("attention.sequences", len(inputs))
            if size <= INLINE_PLAN_CHARS:
                plan = self.plan(model_name, inputs, options)
            else:
                plan = await asyncio.to_thread(self.plan, model_name, inputs, options)
            if span is not None:
                span.set_attributes({"attention.model": plan.model.name,
                                     "attention.tokens": sum(len(t) for t in plan.tokens)})
            return plan

    def span(self, name: str, attributes: dict[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
        """A child span of the current call around one of its steps (tokenization
        here, a response's encoding in the services); yields it, or None when the
        call is not traced (tracing off costs this one check)."""
        return _NO_SPAN if self.trace is None else self.trace.span(name, attributes)

    def _tokenize(self, model: LoadedModel, i: int, seq: SequenceInput) -> Tokens:
        meta = model.metadata
        field: FieldPath = ("sequences", i)
        if seq.token_ids is not None:
            if seq.text_pair:
                raise InvalidArgument((*field, "text_pair"), "only allowed with text input, not token_ids")
            ids = np.asarray(seq.token_ids, dtype=np.int64).reshape(-1)
            if ids.size == 0:
                raise InvalidArgument((*field, "token_ids", "ids"), "empty sequence; give at least one token id")
            bad = np.flatnonzero((ids < 0) | (ids >= meta.vocab_size))
            if bad.size:
                j = int(bad[0])
                raise InvalidArgument((*field, "token_ids", "ids", j),
                                      f"token id {int(ids[j])} is outside the vocabulary [0, {meta.vocab_size})")
            types = np.zeros_like(ids) if seq.type_ids is None or len(seq.type_ids) == 0 \
                else np.asarray(seq.type_ids, dtype=np.int64).reshape(-1)
            if types.shape != ids.shape:
                raise InvalidArgument((*field, "token_ids", "type_ids"),
                                      f"has {types.size} entries; must be empty or match the {ids.size} ids")
            bad = np.flatnonzero((types < 0) | (types >= max(meta.type_vocab_size, 1)))
            if bad.size:
                j = int(bad[0])
                raise InvalidArgument((*field, "token_ids", "type_ids", j), f"type id {int(types[j])} is outside "
                                      f"[0, {meta.type_vocab_size})")
            tokens = model.tokenizer.from_ids(ids, types)
            where: FieldPath = (*field, "token_ids", "ids")
        else:
            if not seq.text or not seq.text.strip():
                raise InvalidArgument((*field, "text"), "empty sequence; give non-blank text or token_ids")
            where = (*field, "text")
            self._probe(model, where, seq.text, seq.text_pair)
            tokens = model.tokenizer.encode(seq.text, seq.text_pair or None)
        if len(tokens) > meta.max_positions:
            raise InvalidArgument(
                where,
                f"{len(tokens)} tokens (special tokens included) exceed the model's {meta.max_positions} "
                f"positions; nothing is truncated, split the input",
            )
        return tokens

    def _probe(self, model: LoadedModel, where: FieldPath, text: str, pair: str | None) -> None:
        """Stop early on a long text: when a prefix of it (cut at a space) already
        has more tokens than the model's positions, the whole text has too."""
        limit = model.metadata.max_positions
        probe = limit * PROBE_CHARS_PER_TOKEN
        if len(text) + len(pair or "") <= probe:
            return
        prefix = text[:probe]
        cut = prefix.rfind(" ")
        prefix = prefix[:cut] if cut > 0 else prefix
        n = len(model.tokenizer.encode(prefix))
        if n > limit + PROBE_MARGIN:
            raise InvalidArgument(where, f"more than {limit} tokens (already {n} in its first {len(prefix)} "
                                  f"characters) exceed the model's {limit} positions; nothing is truncated, "
                                  "split the input")

    # -- execution ------------------------------------------------------------------

    def batcher(self, model: LoadedModel) -> Batcher:
        batcher = self._batchers.get(model.name)
        if batcher is None or batcher.model is not model:
            batcher = self._batchers[model.name] = Batcher(model, self.batch_config, self.observer, self.trace)
        return batcher

    def batchers(self) -> list[Batcher]:
        return list(self._batchers.values())

    def stats(self, model: LoadedModel) -> BatcherStats:
        return self.batcher(model).stats

    async def load_model(self, name: str) -> LoadedModel:
        """Load or reload a model folder while serving; calls already under way on a
        previous instance finish there. Concurrent loads of one model are one load:
        every caller waits for it and gets its outcome."""
        check_model_name(name)
        loading = self._loading.get(name)
        if loading is None:
            loading = self._loading[name] = asyncio.ensure_future(self._load(name))
            loading.add_done_callback(lambda _: self._loading.pop(name, None))
        return await asyncio.shield(loading)

    async def _load(self, name: str) -> LoadedModel:
        model = await asyncio.to_thread(self.repository.load_one, name)
        old = self._batchers.pop(name, None)
        if old is not None and old.model is not model:
            task = asyncio.get_running_loop().create_task(old.drain_and_close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return model

    async def unload_model(self, name: str) -> None:
        check_model_name(name)
        self.repository.unload(name)
        old = self._batchers.pop(name, None)
        if old is not None:
            await old.drain_and_close()

    async def reserve(self, nbytes: int, timeout: float | None) -> Lease:
        """Room in the pending-result budget for a response of about `nbytes`,
        before any of it is computed; the transport releases it once sent."""
        return await self.budget.acquire(nbytes, timeout)

    @contextlib.asynccontextmanager
    async def _submitted(self, plan: Plan, timeout: float | None, finish: Callable[[SequenceOutput], Any] | None,
                         into: Into | None = None) -> AsyncIterator[list[Job]]:
        """Queue every sequence of a plan; on exit drop what is still queued and
        count the call as a success (the body finished) or a failure."""
        batcher = self.batcher(plan.model)
        started = time.perf_counter_ns()
        batcher.enter()
        ok = False
        jobs: list[Job] = []
        try:
            jobs = batcher.submit(plan, list(range(len(plan.tokens))), timeout, finish, into)
            yield jobs
            ok = True
        finally:
            batcher.discard(jobs)
            batcher.leave()
            (batcher.stats.success if ok else batcher.stats.fail).add(time.perf_counter_ns() - started)

    async def analyze(self, plan: Plan, timeout: float | None = None,
                      finish: Callable[[SequenceOutput], T] | None = None, into: Into | None = None) -> list[T]:
        """Every result of a plan in request order (after `finish`, which runs in
        the post-processing thread). `timeout` bounds the time spent queued.
        The caller holds a reservation for the response (`reserve`). `into`: where
        a sequence computed alone writes its outputs (batcher.Into)."""
        async with self._submitted(plan, timeout, finish, into) as jobs:
            return list(await asyncio.gather(*(j.future for j in jobs)))

    async def analyze_stream(self, plan: Plan, timeout: float | None = None,
                             finish: Callable[[SequenceOutput], T] | None = None,
                             into: Into | None = None) -> AsyncIterator[T]:
        """Results one by one in request order, computed no faster than the caller
        takes them: sequences are queued while the ones computed ahead of what was
        taken stay within `stream_window_bytes` (always at least the next one), and
        each holds its share of the pending-result budget until the caller asks
        for the following result (for gRPC: until it was written)."""
        batcher = self.batcher(plan.model)
        count = len(plan.tokens)
        sizes = [plan.sequence_bytes(i) for i in range(count)]
        deadline = None if timeout is None else time.monotonic() + timeout
        window = self.limits.stream_window_bytes
        pending: dict[int, Job] = {}  # queued or computed, not yet taken; a taken result is not kept
        leases: list[Lease] = []
        submitted = 0
        ahead = 0  # bytes of the results submitted and not yet taken
        started = time.perf_counter_ns()
        ok = False
        batcher.enter()

        def remaining() -> float | None:
            return None if deadline is None else max(deadline - time.monotonic(), 0.0)

        def submit(lease: Lease) -> None:
            nonlocal ahead, submitted
            leases.append(lease)
            pending[submitted] = batcher.submit(plan, [submitted], remaining(), finish, into)[0]
            ahead += sizes[submitted]
            submitted += 1

        def top_up() -> None:
            """Queue what fits the window (one result ahead always does) and the budget now."""
            while submitted < count and (ahead == 0 or ahead + sizes[submitted] <= window):
                lease = self.budget.try_acquire(sizes[submitted])
                if lease is None:
                    return
                submit(lease)

        try:
            for i in range(count):
                if submitted == i:  # nothing queued ahead: wait in line for room for this one
                    submit(await self.reserve(sizes[i], remaining()))
                top_up()
                result = await pending.pop(i).future
                ahead -= sizes[i]
                top_up()  # the next results compute while this one is written
                yield result
                del result
                leases[i].release()
            ok = True
        finally:
            batcher.discard(list(pending.values()))
            batcher.leave()
            for lease in leases:
                lease.release()
            (batcher.stats.success if ok else batcher.stats.fail).add(time.perf_counter_ns() - started)

    def stop_accepting(self) -> None:
        """Refuse new calls (shutdown); the calls under way still complete."""
        self._accepting = False
        for batcher in self._batchers.values():
            batcher.stop_accepting()

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
