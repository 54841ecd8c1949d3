"""attention.v1 over the engine, whatever the transport: grpc_api/servicer.py
serves it over gRPC, http_api/v1.py as HTTP/JSON (the protobuf JSON mapping of
the same messages).

Analyze and AnalyzeStream return wire bytes encoded in the engine's
post-processing thread (see converters); a response of full matrices only is laid
out before the run and written by ONNX Runtime in place (converters.Preencoder)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import cast

from attention_client.protocol import attention_pb2 as pb

from ..runtime.budget import Lease
from ..runtime.engine import Engine
from ..runtime.types import Plan
from . import converters
from .response_size import ResponseSize

# Below this a unary response is joined on the event loop; above, in a thread.
INLINE_JOIN_BYTES = 1 << 20


class AttentionService:
    def __init__(self, engine: Engine, response_size: ResponseSize) -> None:
        self.engine = engine
        self.response_size = response_size

    async def plan(self, request: pb.AnalyzeRequest) -> Plan:
        sequences = converters.sequences_from_pb(request, self.engine.limits.max_batch_size)  # counts first
        return await self.engine.plan_async(request.model, sequences, converters.options_from_pb(request.options))

    async def analyze(self, request: pb.AnalyzeRequest, timeout: float | None,
                      size_factor: float = 1.0, memory_factor: float = 1.0) -> tuple[bytes, Lease]:
        """The encoded AnalyzeResponse and its share of the pending-result budget
        (release it once sent). `size_factor`: how much larger than the protobuf the
        transport's encoding is (base64 in JSON), for the response size limit;
        `memory_factor`: how much memory the transport's encoding takes at its peak,
        for the budget."""
        plan = await self.plan(request)
        size = self.response_size.unary(plan, size_factor)
        lease = await self.engine.reserve(int(size * memory_factor), timeout)
        try:
            if len(plan.tokens) == 1:
                pre = converters.Preencoder(plan, plan.model.name)
                results = await self.engine.analyze(plan, timeout, finish=pre.finish, into=pre.into)
            else:
                results = await self.engine.analyze(plan, timeout, finish=converters.result_parts)
            with self.engine.span("encode"):
                if isinstance(results[0], bytes):  # the whole response, laid out and written in place
                    return results[0], lease
                parts = converters.analyze_response_parts(plan.model.name, cast(list[converters.Parts], results))
                if converters.parts_size(parts) <= INLINE_JOIN_BYTES:
                    return b"".join(parts), lease
                return await asyncio.to_thread(b"".join, parts), lease
        except BaseException:
            lease.release()
            raise

    async def analyze_stream(self, request: pb.AnalyzeRequest, timeout: float | None) -> AsyncGenerator[bytes, None]:
        """One encoded SequenceResult a sequence, each within the response size limit."""
        plan = await self.plan(request)
        self.response_size.streamed(plan)
        pre = converters.Preencoder(plan, None)
        async for message in self.engine.analyze_stream(plan, timeout, finish=pre.finish, into=pre.into):
            assert isinstance(message, bytes)
            yield message
            del message  # not kept while the next one is computed

    def list_models(self) -> pb.ListModelsResponse:
        repo = self.engine.repository
        return pb.ListModelsResponse(
            models=[converters.model_info_to_pb(m.metadata, self.engine.limits, m.roles) for m in repo],
            default_model=repo.default_model,
        )

    def get_model(self, name: str) -> pb.ModelInfo:
        model = self.engine.repository.get(name)
        return converters.model_info_to_pb(model.metadata, self.engine.limits, model.roles)
