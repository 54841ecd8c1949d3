"""The Open Inference Protocol's REST API (KServe v2, with Triton's binary tensor
data, model configuration, statistics and model repository extensions): routes
over services.inference, the same implementation the gRPC port serves."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import FieldPath, InvalidArgument, Unavailable, quote
from ..services.inference import InferenceService
from ..services.oip_codec import check_shapes
from . import rest_codec
from .body import read_body, read_json
from .messages import plain
from .responses import JSON, PartsResponse, dumps, json_response

# Requests and responses with more bytes than this are decoded / encoded off the event loop.
INLINE_JSON_BYTES = 1 << 20
# Bodies of the repository and shared-memory calls (`{"ready": true}`, `{"key": ...}`): a fixed limit.
SMALL_BODY_BYTES = 64 << 10
SMALL_BODY_LIMIT = "fixed for the repository routes"


def _checked(value: Any, allowed: dict[str, type], path: FieldPath = (), why: str = "") -> dict[str, Any]:
    """A small JSON object of a repository call (None: no body) with only the keys this
    server acts on: anything else is refused by name, never ignored."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(path or "body", f"must be a JSON object, got {quote(value)}")
    for key, item in value.items():
        kind = allowed.get(key)
        if kind is None:
            raise InvalidArgument((*path, key), f"is not supported (supported: {', '.join(allowed) or 'none'}){why}")
        if not isinstance(item, kind):
            raise InvalidArgument((*path, key), f"must be a {kind.__name__}, got {quote(item)}")
    return value


def routes(service: InferenceService, max_request_bytes: int) -> list[Route]:
    def model_of(request: Request) -> tuple[str, str]:
        return request.path_params["model"], request.path_params.get("version", "")

    async def server_metadata(request: Request) -> Response:
        return json_response(rest_codec.document(service.server_metadata()))

    async def live(request: Request) -> Response:
        return json_response({"live": True})

    async def ready(request: Request) -> Response:
        if not service.server_ready():
            raise Unavailable("not ready: " + ("draining" if service.draining else "the default model is not loaded"))
        return json_response({"ready": True})

    async def model_metadata(request: Request) -> Response:
        return json_response(rest_codec.document(service.model_metadata(*model_of(request))))

    async def model_ready(request: Request) -> Response:
        name, version = model_of(request)
        if not service.model_ready(name, version):
            raise Unavailable(f"model {name} is not ready: the server is draining")
        return json_response({"name": name, "ready": True})

    async def model_config(request: Request) -> Response:
        # Triton's REST API returns the configuration itself (gRPC wraps it in `config`).
        return json_response(rest_codec.document(service.model_config(*model_of(request)).config))

    async def statistics(request: Request) -> Response:
        name, version = request.path_params.get("model", ""), request.path_params.get("version", "")
        return json_response(rest_codec.document(service.statistics(name, version)))

    async def infer(request: Request) -> Response:
        name, version = model_of(request)
        model = service.model(name, version)  # an unknown model is NOT_FOUND before the body is read
        # The inputs' shapes against the limits before any tensor data is converted.
        check = partial(check_shapes, meta=model.metadata, max_batch_size=service.engine.limits.max_batch_size)
        body = await read_body(request, max_request_bytes)  # inflated, if it came compressed
        header_length = request.headers.get(rest_codec.HEADER_LENGTH)
        shared = service.shared_memory.enabled
        if len(body) <= INLINE_JSON_BYTES:
            rest = rest_codec.decode(body, header_length, name, version, check, shared)
        else:  # parsing MBs of JSON numbers would hold up every other call
            rest = await asyncio.to_thread(rest_codec.decode, body, header_length, name, version, check, shared)
        del body
        factor = rest.size_factor()  # JSON outputs: the raw tensors and their JSON are held at once
        response, lease = await service.infer(rest.message, None, factor, factor + 1 if factor > 1 else 1.0)
        # The body holds its share of the pending-result budget until it is sent (or the caller leaves).
        try:
            raw_bytes = sum(len(r) for r in response.raw_output_contents)
            if raw_bytes <= INLINE_JSON_BYTES:
                header, binary = _encode(response, rest)
            else:
                header, binary = await asyncio.to_thread(_encode, response, rest)
            del response
            if not binary:
                return PartsResponse([header], {}, JSON, background=BackgroundTask(lease.release))
            return PartsResponse([header, *binary], {rest_codec.HEADER_LENGTH: str(len(header))},
                                 "application/octet-stream", background=BackgroundTask(lease.release))
        except BaseException:
            lease.release()
            raise

    async def small_body(request: Request) -> Any:
        """A repository call's JSON object; an empty body is the empty object."""
        doc = await read_json(request, SMALL_BODY_BYTES, SMALL_BODY_LIMIT, allow_empty=True)
        if not isinstance(doc, dict):
            raise InvalidArgument("body", f"must be a JSON object, got {quote(doc)}")
        return doc

    async def repository_index(request: Request) -> Response:
        doc = _checked(await small_body(request), {"ready": bool})
        index = service.repository_index(doc.get("ready", False))
        return Response(dumps(plain(index).get("models", [])), media_type=JSON)

    async def load(request: Request) -> Response:
        # tritonclient sends `config` and `file:` parameters only to override the model's files.
        doc = _checked(await small_body(request), {"parameters": dict})
        _checked(doc.get("parameters"), {}, ("parameters",), "; a model loads from its folder in the repository")
        await service.load(request.path_params["model"])
        return json_response({})

    async def unload(request: Request) -> Response:
        # A model here has no dependents (no ensembles): `unload_dependents` changes nothing.
        doc = _checked(await small_body(request), {"parameters": dict})
        _checked(doc.get("parameters"), {"unload_dependents": bool}, ("parameters",))
        await service.unload(request.path_params["model"])
        return json_response({})

    # -- Triton's system shared-memory extension -----------------------------------------

    async def shm_status(request: Request) -> Response:
        regions = service.shared_memory_status(request.path_params.get("region", ""))
        return Response(dumps([rest_codec.document(r) for r in regions.regions.values()]), media_type=JSON)

    async def shm_register(request: Request) -> Response:
        doc = _checked(await small_body(request), {"key": str, "offset": int, "byte_size": int})
        for field in ("key", "byte_size"):
            if field not in doc:
                raise InvalidArgument(field, "is required")
        for field in ("offset", "byte_size"):
            value = doc.get(field, 0)
            if isinstance(value, bool) or value < 0:
                raise InvalidArgument(field, f"must be a non-negative integer, got {quote(value)}")
        service.shared_memory_register(request.path_params["region"], doc["key"], doc.get("offset", 0),
                                       doc["byte_size"])
        return json_response({})

    async def shm_unregister(request: Request) -> Response:
        _checked(await small_body(request), {})
        service.shared_memory_unregister(request.path_params.get("region", ""))
        return json_response({})

    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    table: list[Route] = [
        Route("/v2", server_metadata, name="ServerMetadata"),
        Route("/v2/health/live", live, name="ServerLive"),
        Route("/v2/health/ready", ready, name="ServerReady"),
        Route("/v2/models/stats", statistics, name="ModelStatistics"),
        Route("/v2/repository/index", repository_index, methods=["POST"], name="RepositoryIndex"),
        Route("/v2/repository/models/{model}/load", load, methods=["POST"], name="RepositoryModelLoad"),
        Route("/v2/repository/models/{model}/unload", unload, methods=["POST"], name="RepositoryModelUnload"),
        Route("/v2/systemsharedmemory/status", shm_status, name="SystemSharedMemoryStatus"),
        Route("/v2/systemsharedmemory/region/{region}/status", shm_status, name="SystemSharedMemoryStatus"),
        Route("/v2/systemsharedmemory/region/{region}/register", shm_register, methods=["POST"],
              name="SystemSharedMemoryRegister"),
        Route("/v2/systemsharedmemory/unregister", shm_unregister, methods=["POST"],
              name="SystemSharedMemoryUnregister"),
        Route("/v2/systemsharedmemory/region/{region}/unregister", shm_unregister, methods=["POST"],
              name="SystemSharedMemoryUnregister"),
    ]
    for base in (model, versioned):
        table += [
            Route(base, model_metadata, name="ModelMetadata"),
            Route(f"{base}/ready", model_ready, name="ModelReady"),
            Route(f"{base}/config", model_config, name="ModelConfig"),
            Route(f"{base}/stats", statistics, name="ModelStatistics"),
            Route(f"{base}/infer", infer, methods=["POST"], name="ModelInfer"),
        ]
    return table


def _encode(response: Any, rest: rest_codec.RestRequest) -> tuple[bytes, list[bytes]]:
    doc, binary = rest_codec.encode(response, rest)
    return dumps(doc), binary

