"""attention.v1.AttentionService: thin handlers over the engine.

Analyze and AnalyzeStream return wire bytes encoded in the engine's
post-processing thread (see converters); server.py registers them with an
identity serializer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from attention_client.protocol import attention_pb2 as pb

from ..runtime.engine import Engine
from ..runtime.types import Plan
from . import converters
from .response_size import ResponseSize

# Below this a unary response is joined on the event loop; above, in a thread.
INLINE_JOIN_BYTES = 1 << 20


class AttentionServicer:
    def __init__(self, engine: Engine, response_size: ResponseSize) -> None:
        self.engine = engine
        self.response_size = response_size

    async def _plan(self, request: pb.AnalyzeRequest) -> Plan:
        return await self.engine.plan_async(
            request.model, converters.sequences_from_pb(request), converters.options_from_pb(request.options)
        )

    async def Analyze(self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext) -> bytes:
        plan = await self._plan(request)
        lease = await self.engine.reserve(self.response_size.unary(plan), context.time_remaining())
        # The response holds its share of the pending-result budget until the call is over (sent or dropped).
        context.add_done_callback(lease.release_when_done)  # type: ignore[arg-type]  # stubs: a class
        results = await self.engine.analyze(plan, context.time_remaining(), finish=converters.result_parts)
        parts = converters.analyze_response_parts(plan.model.name, results)
        if converters.parts_size(parts) <= INLINE_JOIN_BYTES:
            return b"".join(parts)
        return await asyncio.to_thread(b"".join, parts)

    async def AnalyzeStream(
        self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        plan = await self._plan(request)
        self.response_size.streamed(plan)
        async for message in self.engine.analyze_stream(plan, context.time_remaining(),
                                                        finish=converters.encode_result):
            yield message
            del message  # not kept while the next one is computed

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        repo = self.engine.repository
        return pb.ListModelsResponse(
            models=[converters.model_info_to_pb(m.metadata, self.engine.limits, m.roles) for m in repo],
            default_model=repo.default_model,
        )

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        model = self.engine.repository.get(request.name)
        return converters.model_info_to_pb(model.metadata, self.engine.limits, model.roles)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method table; Analyze* responses are pre-encoded bytes."""
        identity = bytes
        methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Analyze": grpc.unary_unary_rpc_method_handler(
                self.Analyze, request_deserializer=pb.AnalyzeRequest.FromString, response_serializer=identity),
            "AnalyzeStream": grpc.unary_stream_rpc_method_handler(
                self.AnalyzeStream, request_deserializer=pb.AnalyzeRequest.FromString, response_serializer=identity),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.ListModels, request_deserializer=pb.ListModelsRequest.FromString,
                response_serializer=pb.ListModelsResponse.SerializeToString),
            "GetModel": grpc.unary_unary_rpc_method_handler(
                self.GetModel, request_deserializer=pb.GetModelRequest.FromString,
                response_serializer=pb.ModelInfo.SerializeToString),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttentionService"].full_name
