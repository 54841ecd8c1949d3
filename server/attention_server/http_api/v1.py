"""attention.v1 as HTTP/JSON: the request and response bodies are protobuf's JSON
mapping of the same messages (json_format: lowerCamelCase names, enums by name,
tensors' `data` as base64 of their raw little-endian bytes), over
services.attention, the implementation the gRPC port serves. Also the explorer
page, which calls these routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from attention_client.protocol import attention_pb2 as pb
from attention_client.viz import explorer_html

from ..services.attention import AttentionService
from .body import read_analyze_request
from .messages import mapped
from .responses import JSON, LinesResponse, PartsResponse, dumps, json_response

# base64 is 4/3 of the raw bytes, plus JSON's names and punctuation.
JSON_SIZE_FACTOR = 1.4
# At its peak the JSON encoding holds the protobuf bytes, the parsed message, the
# dict with base64 strings and the JSON bytes: measured 7.5x the raw size for one
# 512-token sequence before the JSON body was built in a thread that frees as it
# goes; reserved as 6x in the result budget (memory the server really holds).
JSON_MEMORY_FACTOR = 6.0
INLINE_JSON_BYTES = 1 << 20
NDJSON = "application/x-ndjson"


def _response_json(raw: bytes) -> bytes:
    return dumps(mapped(pb.AnalyzeResponse.FromString(raw)))


def _result_json(raw: bytes) -> bytes:
    return dumps(mapped(pb.SequenceResult.FromString(raw))) + b"\n"


def routes(service: AttentionService, max_request_bytes: int) -> list[Route]:
    async def request_of(request: Request) -> pb.AnalyzeRequest:
        return await read_analyze_request(request, max_request_bytes, service)

    async def analyze(request: Request) -> Response:
        raw, lease = await service.analyze(await request_of(request), None, JSON_SIZE_FACTOR, JSON_MEMORY_FACTOR)
        try:
            body = _response_json(raw) if len(raw) <= INLINE_JSON_BYTES else await asyncio.to_thread(
                _response_json, raw)
            del raw
            return PartsResponse([body], {}, JSON, background=BackgroundTask(lease.release))
        except BaseException:
            lease.release()
            raise

    async def analyze_stream(request: Request) -> Response:
        """One JSON SequenceResult a line (newline-delimited JSON), as AnalyzeStream sends them."""
        message = await request_of(request)
        results = service.analyze_stream(message, None)
        try:
            first = await anext(results)  # errors before the first result get a status, not a broken stream
        except BaseException:
            await results.aclose()
            raise

        async def lines() -> AsyncIterator[bytes]:
            # Closed by LinesResponse however the reply ends: the stream's window goes back at once.
            try:
                yield await asyncio.to_thread(_result_json, first)
                async for raw in results:
                    yield await asyncio.to_thread(_result_json, raw)
            finally:
                await results.aclose()

        return LinesResponse(lines(), NDJSON)

    async def list_models(request: Request) -> Response:
        return json_response(mapped(service.list_models()))

    async def get_model(request: Request) -> Response:
        return json_response(mapped(service.get_model(request.path_params.get("name", ""))))

    async def explore(request: Request) -> Response:
        return HTMLResponse(explorer_html())

    return [
        Route("/v1/analyze", analyze, methods=["POST"], name="Analyze"),
        Route("/v1/analyze_stream", analyze_stream, methods=["POST"], name="AnalyzeStream"),
        Route("/v1/models", list_models, name="ListModels"),
        Route("/v1/models/", get_model, name="GetModel"),  # no name: the default model
        Route("/v1/models/{name}", get_model, name="GetModel"),
        Route("/explore", explore, name="Explore"),
    ]
