"""inference.GRPCInferenceService: the Open Inference Protocol over gRPC, a thin
adapter over services.inference (shared with the HTTP/REST port); only the
bidirectional ModelStreamInfer is gRPC's own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from .._proto.inference import grpc_service_pb2 as kpb
from .._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from ..errors import ModelNotFound, ServiceError, quote
from ..runtime.budget import Lease
from ..services.inference import InferenceService

log = logging.getLogger(__name__)

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class InferenceServicer(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService, max_stream_inflight: int = 8) -> None:
        self.service = service
        self.max_stream_inflight = max_stream_inflight

    async def ServerLive(self, request: kpb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kpb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self.service.server_ready())

    async def ModelReady(self, request: kpb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ModelReadyResponse:
        try:
            return kpb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))
        except ModelNotFound:
            return kpb.ModelReadyResponse(ready=False)

    async def ServerMetadata(self, request: kpb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> kpb.ServerMetadataResponse:
        return self.service.server_metadata()

    async def ModelMetadata(self, request: kpb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> kpb.ModelMetadataResponse:
        return self.service.model_metadata(request.name, request.version)

    async def ModelConfig(self, request: kpb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> kpb.ModelConfigResponse:
        return self.service.model_config(request.name, request.version)

    async def ModelInfer(self, request: kpb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ModelInferResponse:
        response, lease = await self.service.infer(request, context.time_remaining())
        context.add_done_callback(lease.release_when_done)  # type: ignore[arg-type]  # stubs: a class
        return response

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[kpb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        """Requests are served concurrently, at most `max_stream_inflight` at a time
        (the server reads no further until one is answered, so a caller that does
        not read its responses stops being read); responses go out as they finish,
        each carrying its request's id. A failed request answers with
        error_message and the stream goes on (the protocol's convention); an
        undecodable message ends the stream with INVALID_ARGUMENT once the
        requests before it are answered."""
        Item = tuple[kpb.ModelStreamInferResponse, Lease | None]
        responses: asyncio.Queue[Item | BaseException | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.max_stream_inflight)
        tasks: set[asyncio.Task[None]] = set()

        def failed(request: kpb.ModelInferRequest, message: str) -> Item:
            return kpb.ModelStreamInferResponse(
                error_message=message,
                infer_response=kpb.ModelInferResponse(model_name=request.model_name, id=request.id)), None

        async def serve_one(request: kpb.ModelInferRequest) -> None:
            try:
                response, lease = await self.service.infer(request, None)
                await responses.put((kpb.ModelStreamInferResponse(infer_response=response), lease))
            except ServiceError as exc:
                await responses.put(failed(request, exc.message))
            except Exception:
                log.exception("ModelStreamInfer request %s failed unexpectedly", quote(request.id))
                await responses.put(failed(request, "internal error; see the server log"))

        async def read_all() -> None:
            ending: BaseException | None = None
            requests = aiter(request_iterator)
            try:
                while True:
                    await slots.acquire()
                    try:
                        request = await anext(requests)
                    except StopAsyncIteration:
                        break
                    task = asyncio.ensure_future(serve_one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except Exception as exc:  # noqa: BLE001 - e.g. an undecodable message: answer what came before, then end
                ending = exc
            while tasks:
                await asyncio.gather(*list(tasks))
            await responses.put(ending)

        reader = asyncio.ensure_future(read_all())
        try:
            while isinstance(item := await responses.get(), tuple):
                response, lease = item
                del item
                try:
                    yield response
                finally:
                    del response  # a sent response is not kept while the next one is made
                    if lease is not None:
                        lease.release()
                    slots.release()
            if item is not None:
                raise item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            while not responses.empty():  # answered but never sent (the caller left)
                left = responses.get_nowait()
                if isinstance(left, tuple) and left[1] is not None:
                    left[1].release()

    async def ModelStatistics(self, request: kpb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> kpb.ModelStatisticsResponse:
        return self.service.statistics(request.name, request.version)

    async def RepositoryIndex(self, request: kpb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> kpb.RepositoryIndexResponse:
        return self.service.repository_index(request.ready)

    async def RepositoryModelLoad(self, request: kpb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> kpb.RepositoryModelLoadResponse:
        await self.service.load(request.model_name)
        return kpb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: kpb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> kpb.RepositoryModelUnloadResponse:
        await self.service.unload(request.model_name)
        return kpb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(self, request: kpb.SystemSharedMemoryStatusRequest,
                                       context: grpc.aio.ServicerContext) -> kpb.SystemSharedMemoryStatusResponse:
        return self.service.shared_memory_status(request.name)

    async def SystemSharedMemoryRegister(self, request: kpb.SystemSharedMemoryRegisterRequest,
                                         context: grpc.aio.ServicerContext
                                         ) -> kpb.SystemSharedMemoryRegisterResponse:
        self.service.shared_memory_register(request.name, request.key, request.offset, request.byte_size)
        return kpb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: kpb.SystemSharedMemoryUnregisterRequest,
                                           context: grpc.aio.ServicerContext
                                           ) -> kpb.SystemSharedMemoryUnregisterResponse:
        self.service.shared_memory_unregister(request.name)
        return kpb.SystemSharedMemoryUnregisterResponse()
