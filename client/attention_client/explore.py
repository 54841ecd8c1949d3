"""`attention-client explore`: a small local web server for the explorer page.

It serves the page (`viz.explorer_html`) at `/` and `/explore`, and attention.v1
as HTTP/JSON, the two routes the page calls, the same as the attention server's
own HTTP port has, so the page runs unchanged behind either:

- `POST /v1/analyze`: an AnalyzeRequest in, its AnalyzeResponse out;
- `GET /v1/models`: the ListModelsResponse; `GET /v1/models/{name}`: a ModelInfo.

Bodies are protobuf's JSON mapping (google.protobuf.json_format: lowerCamelCase
names, enums by name, tensor bytes in base64). Each call is proxied to the gRPC
service through the SDK client's channel, with its timeout and token. A request
without a model (an empty `{name}` or `model`) gets the explorer's `--model`.
A failure is an HTTP status and `{"error": message}`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from ._client import AttentionClient
from ._proto.attention.v1 import attention_pb2 as pb
from .errors import AttentionError
from .viz import explorer_html

log = logging.getLogger(__name__)

MAX_TEXT = 2000
"""Most characters of one text (or text pair) the explorer passes on."""
MAX_BODY = 1 << 20
"""Most bytes of a request body."""
PAGE_PATHS = ("/", "/index.html", "/explore")
ANALYZE = "/v1/analyze"
MODELS = "/v1/models"

Reply = tuple[HTTPStatus, bytes, str]
"""An answer: status, body and its content type."""

# What a failed call's gRPC status becomes. The explorer is a gateway: a status
# that says nothing about the request (INTERNAL, UNKNOWN, ...) is 502.
HTTP_STATUS: dict[grpc.StatusCode, HTTPStatus] = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
}
RETRY_AFTER = "1"
"""Seconds a caller told to come back (429, 503) waits first."""


class HTTPError(Exception):
    """A request the explorer answers with `status` and {"error": message}."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def http_error(error: AttentionError) -> HTTPError:
    """A failed call as HTTP: its status (413 for a response over the server's size
    limit, 502 for a code without a status of its own) and its message."""
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not error.retryable:
        status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    else:
        status = HTTP_STATUS.get(error.code, HTTPStatus.BAD_GATEWAY)
    retry = status in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE)
    return HTTPError(status, str(error), {"Retry-After": RETRY_AFTER} if retry else None)


def _json_reply(status: HTTPStatus, value: Any) -> Reply:
    return status, json.dumps(value, separators=(",", ":")).encode(), "application/json"


def _parse(body: bytes, message: Message) -> None:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"request body: not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise HTTPError(HTTPStatus.BAD_REQUEST,
                        f"request body: a JSON object ({message.DESCRIPTOR.name}) expected")
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as exc:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"request body: {exc}") from exc


def _check_texts(request: pb.AnalyzeRequest) -> None:
    for i, sequence in enumerate(request.sequences):
        for name in ("text", "text_pair"):
            n = len(getattr(sequence, name))
            if n > MAX_TEXT:
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"sequences[{i}].{name}: {n} characters; "
                                                        f"the explorer takes at most {MAX_TEXT}")


class Explorer:
    """The explorer's HTTP/JSON gateway to one AttentionService (the client's target);
    `model` stands for an empty model name."""

    def __init__(self, client: AttentionClient, model: str = "") -> None:
        self.client = client
        self.model = model
        self._stub = client._stub

    def _call(self, method: Callable[..., Message], request: Message) -> Message:
        try:
            response: Message = method(request, **self.client._kw(None, None))
        except grpc.RpcError as exc:
            raise http_error(AttentionError.from_rpc_error(exc)) from exc
        return response

    def analyze(self, body: bytes) -> Message:
        """POST /v1/analyze: AnalyzeRequest JSON -> AnalyzeResponse."""
        request = pb.AnalyzeRequest()
        _parse(body, request)
        _check_texts(request)
        request.model = request.model or self.model
        return self._call(self._stub.Analyze, request)

    def list_models(self) -> Message:
        """GET /v1/models -> ListModelsResponse."""
        return self._call(self._stub.ListModels, pb.ListModelsRequest())

    def get_model(self, name: str) -> Message:
        """GET /v1/models/{name} -> ModelInfo."""
        return self._call(self._stub.GetModel, pb.GetModelRequest(name=name or self.model))

    def handler(self) -> type[BaseHTTPRequestHandler]:
        explorer = self

        class Handler(BaseHTTPRequestHandler):
            def _page(self, body: bytes) -> Reply:
                return HTTPStatus.OK, explorer_html().encode(), "text/html; charset=utf-8"

            def _analyze(self, body: bytes) -> Reply:
                if self.headers.get_content_type() != "application/json":
                    # JSON only: a page of another site cannot post here without a CORS preflight.
                    raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                    "request body: Content-Type must be application/json")
                return _json_reply(HTTPStatus.OK, json_format.MessageToDict(explorer.analyze(body)))

            def _list_models(self, body: bytes) -> Reply:
                return _json_reply(HTTPStatus.OK, json_format.MessageToDict(explorer.list_models()))

            def _get_model(self, body: bytes) -> Reply:
                name = unquote(urlsplit(self.path).path[len(MODELS) + 1:])
                return _json_reply(HTTPStatus.OK, json_format.MessageToDict(explorer.get_model(name)))

            def _route(self, path: str) -> tuple[str, Callable[[bytes], Reply]]:
                """The method a path takes and what answers it (given the request body)."""
                if path in PAGE_PATHS:
                    return "GET", self._page
                if path == ANALYZE:
                    return "POST", self._analyze
                if path == MODELS:
                    return "GET", self._list_models
                if path.startswith(MODELS + "/"):
                    return "GET", self._get_model
                raise HTTPError(HTTPStatus.NOT_FOUND, f"{path}: not found")

            def _body(self) -> bytes:
                """The request body, read whole before any answer (an unread body would
                turn closing the connection into a reset that can lose the answer)."""
                length = self.headers.get("Content-Length")
                if length is None:
                    if self.command == "POST":
                        raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "request body: Content-Length required")
                    return b""
                if not length.isdigit():
                    self.close_connection = True
                    raise HTTPError(HTTPStatus.BAD_REQUEST, f"Content-Length: {length!r} is not a number")
                if int(length) > MAX_BODY:
                    self.close_connection = True  # the body stays unread
                    raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                    f"request body: {length} bytes; at most {MAX_BODY}")
                return self.rfile.read(int(length))

            def _handle(self) -> None:
                path = urlsplit(self.path).path
                headers: dict[str, str] = {}
                try:
                    body = self._body()
                    allowed, answer = self._route(path)
                    if self.command != allowed:
                        raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path}: use {allowed}", {"Allow": allowed})
                    status, reply, content_type = answer(body)
                except HTTPError as exc:
                    status, reply, content_type = _json_reply(exc.status, {"error": str(exc)})
                    headers = exc.headers
                except Exception:  # the page gets a message, the log the traceback
                    log.exception("explorer: %s %s failed", self.command, path)
                    status, reply, content_type = _json_reply(HTTPStatus.INTERNAL_SERVER_ERROR,
                                                              {"error": "the explorer failed; see its log"})
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(reply)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(reply)

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def log_message(self, fmt: str, *args: Any) -> None:
                log.info("%s " + fmt, self.address_string(), *args)

        return Handler

    def server(self, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
        """The explorer's HTTP server on host:port (port 0: a free one, in `server_port`)."""
        return ThreadingHTTPServer((host, port), self.handler())
