"""attention.v1.AttentionService: thin handlers over the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client._proto.attention.v1 import attention_pb2_grpc as pb_grpc

from ..runtime.engine import Engine
from . import converters
from .errors import stream, unary


class AttentionServicer(pb_grpc.AttentionServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _plan(self, request: pb.AnalyzeRequest):  # type: ignore[no-untyped-def]
        return self.engine.plan(
            request.model, converters.sequences_from_pb(request), converters.options_from_pb(request.options)
        )

    @unary
    async def Analyze(self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext) -> pb.AnalyzeResponse:
        plan = self._plan(request)
        outputs = await self.engine.analyze(plan)
        return pb.AnalyzeResponse(model=plan.model.name, results=[converters.result_to_pb(o) for o in outputs])

    @stream
    async def AnalyzeStream(
        self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SequenceResult]:
        plan = self._plan(request)
        async for out in self.engine.analyze_stream(plan):
            yield converters.result_to_pb(out)

    @unary
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        repo = self.engine.repository
        return pb.ListModelsResponse(
            models=[converters.model_info_to_pb(m.metadata, self.engine.limits) for m in repo],
            default_model=repo.default_model,
        )

    @unary
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        model = self.engine.repository.get(request.name)
        return converters.model_info_to_pb(model.metadata, self.engine.limits)
