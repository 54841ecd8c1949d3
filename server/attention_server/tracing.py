"""OpenTelemetry traces, transport-neutral: no gRPC and no HTTP framework here.

A `Tracing` holds its own TracerProvider (never the process-global one, so tests
pass a provider of their own); `Tracing.from_env()` builds it from the standard
`OTEL_*` variables and `Tracing()` is tracing off. Off costs one check per call:
no span, no context extracted.

The spans of a call:

    attention.v1.AttentionService/Analyze    SERVER, the caller's traceparent is its parent
      tokenize                               the engine's plan (validation and tokenization)
      queue                                  from enqueue to the start of its runtime batch; links to the batch
      encode                                 building a unary response (a stream's are encoded by its batches)
    batch                                    a root span per runtime batch, linked to every call in it

A transport starts the call's span with `start_call` (any `Mapping[str, str]` of
headers or metadata carries the W3C `traceparent`/`tracestate`) and ends it with
`CallSpan.end`; the engine and the services add child spans with `Engine.span`,
and the batcher reports its batches, both through runtime.batcher.TraceHooks,
which `Tracing` implements.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context, attach
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from . import __version__

if TYPE_CHECKING:
    from .runtime.batcher import Job

TRACE_HEADERS = ("traceparent", "tracestate")
DEFAULT_SERVICE_NAME = "attention-server"
EXPORTER_GROUP = "opentelemetry_traces_exporter"
# OTEL_TRACES_EXPORTER=otlp names a package by the OTLP protocol, as the SDK's autoconfiguration does.
OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
OTLP_PACKAGES = {"otlp_proto_grpc": "opentelemetry-exporter-otlp-proto-grpc",
                 "otlp_proto_http": "opentelemetry-exporter-otlp-proto-http"}

_PROPAGATOR = TraceContextTextMapPropagator()
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


class TracingConfigError(Exception):
    """The OTEL_* variables ask for something this installation cannot do (an unknown
    or missing exporter); raised at start, with what to install or set."""


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The span exporters OTEL_TRACES_EXPORTER asks for, as entry point names
    (empty: tracing off; unset is off too, not the specification's `otlp`)."""
    value = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not value or value.lower() == "none":
        return []
    names = []
    for name in (n.strip() for n in value.split(",")):
        if name == "otlp":
            protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip()
            if protocol not in OTLP_BY_PROTOCOL:
                raise TracingConfigError(f"OTLP protocol {protocol!r} is not supported; set "
                                         f"OTEL_EXPORTER_OTLP_PROTOCOL to one of {sorted(OTLP_BY_PROTOCOL)}")
            name = OTLP_BY_PROTOCOL[protocol]
        if name and name != "none" and name not in names:
            names.append(name)
    return names


def load_exporters(names: Sequence[str]) -> list[SpanExporter]:
    """One exporter per name, from the `opentelemetry_traces_exporter` entry points
    (an installed exporter package registers its own); each reads its own
    OTEL_EXPORTER_* variables (endpoint, headers, timeout)."""
    exporters = []
    for name in names:
        found = entry_points(group=EXPORTER_GROUP, name=name)
        if not found:
            hint = f"pip install {OTLP_PACKAGES[name]}" if name in OTLP_PACKAGES else "install the package providing it"
            raise TracingConfigError(f"OTEL_TRACES_EXPORTER: no span exporter named {name!r} is installed ({hint}); "
                                     f"installed: {sorted(ep.name for ep in entry_points(group=EXPORTER_GROUP))}")
        cls = next(iter(found)).load()
        if not (isinstance(cls, type) and issubclass(cls, SpanExporter)):
            raise TracingConfigError(f"OTEL_TRACES_EXPORTER: {name!r} is not a span exporter")
        exporters.append(cls())
    return exporters


def resource_from_env() -> Resource:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (read by the SDK), with this
    server's name and version where they name none."""
    resource = Resource({SERVICE_VERSION: __version__}).merge(Resource.create())
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def carrier(pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """The trace headers of key/value pairs (gRPC metadata, raw HTTP headers) as a
    carrier for `start_call`; repeated `tracestate` entries are joined."""
    out: dict[str, str] = {}
    for key, value in pairs:
        key = key.lower()
        if key in TRACE_HEADERS and isinstance(value, str):
            out[key] = f"{out[key]},{value}" if key in out else value
    return out


class CallSpan:
    """The span of one call, current in its context from `start_call` to `end`."""

    __slots__ = ("_token", "span")

    def __init__(self, span: Span, token: contextvars.Token[Context]) -> None:
        self.span = span
        self._token = token

    def end(self, attributes: Mapping[str, AttributeValue], error_type: str | None = None,
            exception: BaseException | None = None) -> None:
        """Close the span with the outcome's attributes (e.g. the status code);
        `error_type` marks it failed (the server's fault, not the caller's), and an
        unexpected `exception` is recorded on it."""
        span = self.span
        span.set_attributes(attributes)
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, error_type))
        if exception is not None:
            span.record_exception(exception)
        span.end()
        # A stream's handler may be finalized in another context than the one it
        # started in (the caller went away): the reset is then moot, and not an error.
        with contextlib.suppress(ValueError):
            self._token.var.reset(self._token)


class _BatchSpan:
    """A runtime batch's span; `end` may come from any thread, the first one counts."""

    __slots__ = ("ended", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.ended = False

    def end(self, error: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        self.span.end()


class Tracing:
    """Traces of a server. `Tracing()` is off; `Tracing(provider)` records through
    `provider` (tests: an InMemorySpanExporter); `Tracing.from_env()` reads OTEL_*."""

    def __init__(self, provider: TracerProvider | None = None, *, owns_provider: bool = False) -> None:
        self.provider = provider
        self._owns_provider = owns_provider
        self.tracer = provider.get_tracer("attention_server", __version__) if provider is not None else None

    @classmethod
    def from_env(cls) -> Tracing:
        """From the standard variables: OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER (console,
        otlp, none, or any installed exporter's name; unset is off), OTEL_SERVICE_NAME,
        OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), the exporters' own
        OTEL_EXPORTER_* and the batch processor's OTEL_BSP_*. Raises TracingConfigError."""
        environ = os.environ
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls()
        exporters = load_exporters(exporter_names(environ))
        if not exporters:
            return cls()
        provider = TracerProvider(resource=resource_from_env())  # reads OTEL_TRACES_SAMPLER(_ARG) itself
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, owns_provider=True)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def close(self) -> None:
        """Export what is left (blocking: up to the exporters' timeouts); a provider
        built here is shut down, one given is only flushed (its owner shuts it down)."""
        if self.provider is None:
            return
        self.provider.force_flush()
        if self._owns_provider:
            self.provider.shutdown()

    # -- calls (transports) ---------------------------------------------------------

    def start_call(self, name: str, headers: Mapping[str, str],
                   attributes: Mapping[str, AttributeValue]) -> CallSpan:
        """Start a call's SERVER span as a child of the caller's `traceparent` in
        `headers` (a new trace without one) and make it current until `end`.
        Only call it when `enabled`."""
        assert self.tracer is not None
        parent = _PROPAGATOR.extract(headers, context=Context())  # never the ambient context
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        return CallSpan(span, attach(trace.set_span_in_context(span, parent)))

    def span(self, name: str,
             attributes: Mapping[str, AttributeValue] | None = None) -> contextlib.AbstractContextManager[Any]:
        """A child span of the current call around a step of it (current while it
        runs; yields the span); nothing outside a recorded call."""
        if self.tracer is None or not trace.get_current_span().is_recording():
            return _NO_SPAN
        return self.tracer.start_as_current_span(name, attributes=attributes)

    # -- runtime batches (runtime.batcher.TraceHooks) ---------------------------------

    def caller(self) -> SpanContext | None:
        """The current call's span, kept with its queued sequences."""
        context = trace.get_current_span().get_span_context()
        return context if context.is_valid else None

    def batch_started(self, model: str, batch: Sequence[Job], tokens: int, padded_tokens: int) -> _BatchSpan | None:
        """A runtime batch starts: one `queue` span per call in it (from its first
        sequence's enqueue until now) and the batch's own span, returned for its end."""
        assert self.tracer is not None
        calls: dict[tuple[int, int], tuple[SpanContext, int, float]] = {}
        for job in batch:
            context = job.trace
            if context is None:
                continue
            key = (context.trace_id, context.span_id)
            _, count, enqueued = calls.get(key, (context, 0, job.enqueued))
            calls[key] = (context, count + 1, min(enqueued, job.enqueued))
        if not calls:
            return None
        now_ns, now = time.time_ns(), time.monotonic()
        # The batch span is a root, linked to every call, rather than a child of the
        # first call: it is shared work that belongs to no single caller. As a child
        # it would put every other call's sequences into one caller's trace (chosen
        # by queue order) and could outlive that call (cancelled, or past its deadline)
        # while still serving the others. This is how the messaging conventions
        # model a batch of messages. Each call's `queue` span links back to it. It is
        # made only when some call in it is sampled; the sampler decides on it as on
        # any root span (always, with the default parentbased_always_on).
        batch_span = None
        if any(context.trace_flags.sampled for context, _, _ in calls.values()):
            batch_span = self.tracer.start_span(
                "batch", context=Context(), start_time=now_ns,
                links=[Link(context, {"attention.sequences": count}) for context, count, _ in calls.values()],
                attributes={"batch.size": len(batch), "batch.tokens": tokens, "batch.padded_tokens": padded_tokens,
                            "attention.model": model})
        back = [Link(batch_span.get_span_context())] if batch_span is not None else None
        for context, count, enqueued in calls.values():
            queued = self.tracer.start_span(
                "queue", context=trace.set_span_in_context(NonRecordingSpan(context)),
                start_time=now_ns - int((now - enqueued) * 1e9), links=back,
                attributes={"attention.sequences": count, "attention.model": model})
            queued.end(end_time=now_ns)
        return _BatchSpan(batch_span) if batch_span is not None else None
