"""inference.GRPCInferenceService (Open Inference Protocol / KServe v2, with
Triton's configuration, statistics and repository extensions) over the same
engine, batcher and runtime as attention.v1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from .. import __version__
from .._proto.inference import grpc_service_pb2 as kpb
from .._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from ..errors import FailedPrecondition, InvalidArgument, ModelLoadError, ModelNotFound, ServiceError, quote
from ..runtime.budget import Lease
from ..runtime.engine import Engine
from ..runtime.stats import Duration
from ..runtime.types import LoadedModel, SequenceOutput
from . import kserve_codec as codec
from .response_size import ResponseSize

log = logging.getLogger(__name__)

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ["model_configuration", "statistics", "model_repository"]
VERSION = "1"
INLINE_ENCODE_BYTES = 1 << 20


def _duration(d: Duration) -> kpb.StatisticDuration:
    return kpb.StatisticDuration(count=d.count, ns=d.ns)


class InferenceServicer(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine, instances: int, max_queue_delay_us: int, max_stream_inflight: int = 8,
                 model_control_mode: str = "none", response_size: ResponseSize | None = None) -> None:
        self.engine = engine
        self.response_size = response_size or ResponseSize(256 << 20)
        self.model_control_mode = model_control_mode
        self.max_stream_inflight = max_stream_inflight
        self.instances = instances
        self.max_queue_delay_us = max_queue_delay_us
        self.ready = True

    def _model(self, name: str, version: str = "") -> LoadedModel:
        if not name:
            raise InvalidArgument("model_name", "is required")
        model = self.engine.repository.get(name)
        if version not in ("", VERSION):
            raise ModelNotFound(f"{name} version {version}", [f"{n} version {VERSION}"
                                                             for n in self.engine.repository.names()])
        return model

    async def ServerLive(self, request: kpb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kpb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self.ready and bool(self.engine.repository.names()))

    async def ModelReady(self, request: kpb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ModelReadyResponse:
        try:
            self._model(request.name, request.version)
        except ModelNotFound:
            return kpb.ModelReadyResponse(ready=False)
        return kpb.ModelReadyResponse(ready=self.ready)

    async def ServerMetadata(self, request: kpb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name="attention-server", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: kpb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> kpb.ModelMetadataResponse:
        meta = self._model(request.name, request.version).metadata
        inputs, outputs = codec.model_tensors(meta)
        return kpb.ModelMetadataResponse(name=meta.name, versions=[VERSION], platform="onnxruntime_onnx",
                                         inputs=codec.tensor_metadata(inputs), outputs=codec.tensor_metadata(outputs))

    async def ModelConfig(self, request: kpb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> kpb.ModelConfigResponse:
        meta = self._model(request.name, request.version).metadata
        config = codec.model_config(meta, self.engine.limits.max_batch_size, self.instances, self.max_queue_delay_us)
        return kpb.ModelConfigResponse(config=config)

    async def _infer(self, request: kpb.ModelInferRequest,
                     timeout: float | None) -> tuple[kpb.ModelInferResponse, Lease]:
        """The response and its share of the pending-result budget (release it once sent)."""
        model = self._model(request.model_name, request.model_version)
        meta = model.metadata
        sequences = codec.decode_request(request, meta, self.engine.limits.max_batch_size)
        names, options = codec.requested_outputs(request, meta)
        try:
            plan = await self.engine.plan_async(model.name, sequences, options)
        except InvalidArgument as exc:  # named as this protocol names its tensors and parameters
            raise InvalidArgument(codec.field_name(exc.field), exc.problem) from None
        size = codec.response_bytes(request, meta, names, [len(t) for t in plan.tokens], len(plan.layers),
                                    len(plan.heads), options.top_k)
        self.response_size.check(size)
        lease = await self.engine.reserve(size, timeout)
        try:
            results: list[SequenceOutput] = await self.engine.analyze(plan, timeout)
            if size <= INLINE_ENCODE_BYTES:
                return codec.encode_response(request, meta, names, results, options.top_k), lease
            # Padding and copying multi-MB outputs stays off the event loop.
            response = await asyncio.to_thread(codec.encode_response, request, meta, names, results, options.top_k)
            return response, lease
        except BaseException:
            lease.release()
            raise

    async def ModelInfer(self, request: kpb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ModelInferResponse:
        response, lease = await self._infer(request, context.time_remaining())
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
                response, lease = await self._infer(request, None)
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
        models = [self._model(request.name, request.version)] if request.name else list(self.engine.repository)
        out = kpb.ModelStatisticsResponse()
        for model in models:
            s = self.engine.stats(model)
            entry = out.model_stats.add(name=model.name, version=VERSION, last_inference=s.last_inference_ms,
                                        inference_count=s.sequences, execution_count=s.batches)
            entry.inference_stats.CopyFrom(kpb.InferStatistics(
                success=_duration(s.success), fail=_duration(s.fail), queue=_duration(s.queue),
                compute_input=_duration(s.compute_input), compute_infer=_duration(s.compute_infer),
                compute_output=_duration(s.compute_output)))
            for size in sorted(s.by_batch_size):
                b = s.by_batch_size[size]
                entry.batch_stats.add(batch_size=size, compute_input=_duration(b.compute_input),
                                      compute_infer=_duration(b.compute_infer),
                                      compute_output=_duration(b.compute_output))
        return out

    async def RepositoryIndex(self, request: kpb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> kpb.RepositoryIndexResponse:
        entries = self.engine.repository.index()
        return kpb.RepositoryIndexResponse(models=[
            kpb.RepositoryIndexResponse.ModelIndex(name=e.name, version=VERSION if e.state == "READY" else "",
                                                   state=e.state, reason=e.reason)
            for e in entries if e.state == "READY" or not request.ready
        ])

    def _model_control(self, what: str) -> None:
        if self.model_control_mode != "explicit":
            raise FailedPrecondition(f"model control is off (--model-control-mode none): models load at start "
                                     f"only and cannot be {what} over the API; start the server with "
                                     "--model-control-mode explicit to allow it")

    async def RepositoryModelLoad(self, request: kpb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> kpb.RepositoryModelLoadResponse:
        self._model_control("loaded")
        if not request.model_name:
            raise InvalidArgument("model_name", "is required")
        try:
            await self.engine.load_model(request.model_name)
        except ModelLoadError as exc:
            # Name the file inside the repository, never the server's own paths.
            reason = str(exc).replace(f"{self.engine.repository.root}/", "").replace(
                str(self.engine.repository.root), "the repository")
            raise FailedPrecondition(f"model {quote(request.model_name)} cannot be loaded: {reason}") from None
        log.info("loaded model %s on request", request.model_name)
        return kpb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: kpb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> kpb.RepositoryModelUnloadResponse:
        self._model_control("unloaded")
        if not request.model_name:
            raise InvalidArgument("model_name", "is required")
        await self.engine.unload_model(request.model_name)
        log.info("unloaded model %s on request", request.model_name)
        return kpb.RepositoryModelUnloadResponse()
