"""attention.v1.AttentionService over gRPC: a thin adapter over
services.attention. Analyze* responses are pre-encoded bytes, registered with an
identity serializer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from attention_client.protocol import attention_pb2 as pb

from ..services.attention import AttentionService


class AttentionServicer:
    def __init__(self, service: AttentionService) -> None:
        self.service = service

    async def Analyze(self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext) -> bytes:
        response, lease = await self.service.analyze(request, context.time_remaining())
        # The response holds its share of the pending-result budget until the call is over (sent or dropped).
        context.add_done_callback(lease.release_when_done)  # type: ignore[arg-type]  # stubs: a class
        return response

    async def AnalyzeStream(
        self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for message in self.service.analyze_stream(request, context.time_remaining()):
            yield message
            del message  # not kept while the next one is computed

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return self.service.list_models()

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return self.service.get_model(request.name)

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
