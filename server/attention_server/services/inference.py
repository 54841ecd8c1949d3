"""The Open Inference Protocol (KServe v2, with Triton's model configuration,
statistics and model repository extensions) over the engine: every operation
takes and returns the protocol's messages (inference/grpc_service.proto), whatever
the transport. grpc_api/kserve.py serves it over gRPC, http_api/oip.py over
HTTP/REST (converting JSON to and from the same messages)."""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import ExitStack
from typing import Any

import numpy as np

from .. import __version__
from .._proto.inference import grpc_service_pb2 as kpb
from ..errors import FailedPrecondition, InvalidArgument, ModelLoadError, ModelNotFound, quote
from ..runtime.budget import Lease
from ..runtime.engine import Engine
from ..runtime.stats import Duration
from ..runtime.types import LoadedModel, ModelMetadata, SequenceOutput
from . import oip_codec as codec
from .response_size import ResponseSize
from .shared_memory import SharedMemoryRegistry

log = logging.getLogger(__name__)

EXTENSIONS = ["model_configuration", "statistics", "model_repository"]
SHARED_MEMORY_EXTENSION = "system_shared_memory"
VERSION = "1"
INLINE_ENCODE_BYTES = 1 << 20


def _release_after(work: asyncio.Future[Any], held: ExitStack) -> None:
    """Close `held` once `work` (a thread) has ended, whatever its outcome."""
    def done(future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: the call that wanted it is gone
        held.close()

    work.add_done_callback(done)


def _duration(d: Duration) -> kpb.StatisticDuration:
    return kpb.StatisticDuration(count=d.count, ns=d.ns)


class InferenceService:
    def __init__(self, engine: Engine, instances: int, max_queue_delay_us: int,
                 model_control_mode: str = "none", response_size: ResponseSize | None = None,
                 shared_memory: SharedMemoryRegistry | None = None) -> None:
        self.engine = engine
        self.shared_memory = shared_memory or SharedMemoryRegistry(enabled=False)
        self.response_size = response_size or ResponseSize(256 << 20)
        self.model_control_mode = model_control_mode
        self.instances = instances
        self.max_queue_delay_us = max_queue_delay_us
        self.draining = False

    def model(self, name: str, version: str = "") -> LoadedModel:
        """The loaded model; ModelNotFound (NOT_FOUND) for an unknown name or version."""
        if not name:
            raise InvalidArgument("model_name", "is required")
        model = self.engine.repository.get(name)
        if version not in ("", VERSION):
            raise ModelNotFound(f"{name} version {version}", [f"{n} version {VERSION}"
                                                             for n in self.engine.repository.names()])
        return model

    # -- health and metadata ---------------------------------------------------------

    def server_ready(self) -> bool:
        """Not while draining, and not before the default model is loaded."""
        repository = self.engine.repository
        return not self.draining and repository.is_loaded(repository.default_model)

    def model_ready(self, name: str, version: str = "") -> bool:
        """False while draining; ModelNotFound for a model the server does not have loaded."""
        self.model(name, version)
        return not self.draining

    def server_metadata(self) -> kpb.ServerMetadataResponse:
        extensions = EXTENSIONS + ([SHARED_MEMORY_EXTENSION] if self.shared_memory.enabled else [])
        return kpb.ServerMetadataResponse(name="attention-server", version=__version__, extensions=extensions)

    def model_metadata(self, name: str, version: str = "") -> kpb.ModelMetadataResponse:
        meta = self.model(name, version).metadata
        inputs, outputs = codec.model_tensors(meta)
        return kpb.ModelMetadataResponse(name=meta.name, versions=[VERSION], platform="onnxruntime_onnx",
                                         inputs=codec.tensor_metadata(inputs), outputs=codec.tensor_metadata(outputs))

    def model_config(self, name: str, version: str = "") -> kpb.ModelConfigResponse:
        meta = self.model(name, version).metadata
        config = codec.model_config(meta, self.engine.limits.max_batch_size, self.instances, self.max_queue_delay_us)
        return kpb.ModelConfigResponse(config=config)

    # -- inference -------------------------------------------------------------------

    async def infer(self, request: kpb.ModelInferRequest, timeout: float | None,
                    size_factor: float = 1.0, memory_factor: float = 1.0) -> tuple[kpb.ModelInferResponse, Lease]:
        """The response and its share of the pending-result budget (release it once
        sent). `size_factor`: how much larger than the raw tensors the transport's
        encoding of the response is (JSON numbers are), for the response size limit;
        `memory_factor`: the encoding's peak memory over the raw tensors, for the budget."""
        model = self.model(request.model_name, request.model_version)
        meta = model.metadata
        timeout = codec.request_timeout(request, timeout)
        shared = codec.output_refs(request)
        sequences = codec.decode_request(request, meta, self.engine.limits.max_batch_size, self._read_shared,
                                         self.engine.limits.max_chars_per_token)
        names, options = codec.requested_outputs(request, meta)
        with ExitStack() as regions:
            # Output regions are looked up and held first, checked against their outputs once the
            # sequences' lengths are known: all before anything is computed. Unregistering one
            # meanwhile never pulls it from under the copy.
            held = {name: regions.enter_context(self.shared_memory.use(ref.region, ref.offset, ref.byte_size,
                                                                       f"output {quote(name)}"))
                    for name, ref in shared.items()}
            try:
                plan = await self.engine.plan_async(model.name, sequences, options)
            except InvalidArgument as exc:  # named as this protocol names its tensors and parameters
                raise InvalidArgument(codec.field_name(exc.field), exc.problem) from None
            dims = ([len(t) for t in plan.tokens], len(plan.layers), len(plan.heads), options.top_k)
            self._check_outputs(request, shared, meta, *dims)
            size = codec.response_bytes(request, meta, names, *dims)
            in_message = [n for n in names if n not in shared]  # shared-memory outputs are not in the message
            sent = codec.response_bytes(request, meta, in_message, *dims) if shared else size
            self.response_size.check(int(sent * size_factor))
            lease = await self.engine.reserve(int(size * memory_factor), timeout)
            try:
                results: list[SequenceOutput] = await self.engine.analyze(plan, timeout)

                def write(name: str, ref: codec.SharedRef, parts: list[np.ndarray]) -> None:
                    nbytes = sum(p.nbytes for p in parts)
                    if nbytes > ref.byte_size:  # BYTES outputs; the others were checked before computing
                        raise InvalidArgument(f"output {quote(name)}", f"parameter '{codec.SHM_BYTE_SIZE}' "
                                              f"{ref.byte_size} is smaller than the output's {nbytes} bytes")
                    held[name].write(ref.offset, [p.data.cast("B") for p in parts])

                encode = (request, meta, names, results, options.top_k, shared, write)
                with self.engine.span("encode"):
                    if size <= INLINE_ENCODE_BYTES:
                        return codec.encode_response(*encode), lease
                    # Padding and copying multi-MB outputs stays off the event loop.
                    work = asyncio.ensure_future(asyncio.to_thread(codec.encode_response, *encode))
                    try:
                        return await asyncio.shield(work), lease
                    except asyncio.CancelledError:
                        if shared:  # the thread may still be writing: its regions stay held until it is done
                            _release_after(work, regions.pop_all())
                        raise
            except BaseException:
                lease.release()
                raise

    # -- shared memory (Triton's system shared-memory extension) ---------------------------

    def _read_shared(self, ref: codec.SharedRef, field: str) -> bytes:
        with self.shared_memory.use(ref.region, ref.offset, ref.byte_size, field) as region:
            return region.read(ref.offset, ref.byte_size)

    @staticmethod
    def _check_outputs(request: kpb.ModelInferRequest, shared: dict[str, codec.SharedRef], meta: ModelMetadata,
                       lengths: list[int], layers: int, heads: int, top_k: int | None) -> None:
        """Each shared-memory output's byte size against the output's (BYTES outputs, whose
        size follows their contents, are checked when written)."""
        length = max(codec.padded_length(request), *lengths)
        for name, ref in shared.items():
            spec = codec.output_shape(name, meta, length, lengths, layers, heads, top_k)
            if spec is None:
                continue
            datatype, shape = spec
            need = math.prod(shape) * codec.NUMPY[datatype].itemsize
            if ref.byte_size < need:
                raise InvalidArgument(f"output {quote(name)}", f"parameter '{codec.SHM_BYTE_SIZE}' "
                                      f"{ref.byte_size} is smaller than the output's {need} bytes ({datatype} "
                                      f"{shape})")

    def shared_memory_status(self, name: str = "") -> kpb.SystemSharedMemoryStatusResponse:
        out = kpb.SystemSharedMemoryStatusResponse()
        for region in self.shared_memory.status(name):
            out.regions[region.name].CopyFrom(kpb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size))
        return out

    def shared_memory_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.shared_memory.register(name, key, offset, byte_size)

    def shared_memory_unregister(self, name: str = "") -> None:
        self.shared_memory.unregister(name)

    # -- statistics and repository ---------------------------------------------------

    def statistics(self, name: str = "", version: str = "") -> kpb.ModelStatisticsResponse:
        models = [self.model(name, version)] if name else list(self.engine.repository)
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

    def repository_index(self, ready_only: bool = False) -> kpb.RepositoryIndexResponse:
        entries = self.engine.repository.index()
        return kpb.RepositoryIndexResponse(models=[
            kpb.RepositoryIndexResponse.ModelIndex(name=e.name, version=VERSION if e.state == "READY" else "",
                                                   state=e.state, reason=e.reason)
            for e in entries if e.state == "READY" or not ready_only
        ])

    def _model_control(self, what: str) -> None:
        if self.model_control_mode != "explicit":
            raise FailedPrecondition(f"model control is off (--model-control-mode none): models load at start "
                                     f"only and cannot be {what} over the API; start the server with "
                                     "--model-control-mode explicit to allow it")

    async def load(self, name: str) -> None:
        self._model_control("loaded")
        if not name:
            raise InvalidArgument("model_name", "is required")
        try:
            await self.engine.load_model(name)
        except ModelLoadError as exc:
            # Name the file inside the repository, never the server's own paths.
            reason = str(exc).replace(f"{self.engine.repository.root}/", "").replace(
                str(self.engine.repository.root), "the repository")
            raise FailedPrecondition(f"model {quote(name)} cannot be loaded: {reason}") from None
        log.info("loaded model %s on request", name)

    async def unload(self, name: str) -> None:
        self._model_control("unloaded")
        if not name:
            raise InvalidArgument("model_name", "is required")
        await self.engine.unload_model(name)
        log.info("unloaded model %s on request", name)
