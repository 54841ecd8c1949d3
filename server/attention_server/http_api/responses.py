"""Response bodies: JSON (orjson, numpy arrays included) and multi-part binary
bodies sent without joining their parts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

JSON = "application/json"
OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def dumps(body: Any) -> bytes:
    return orjson.dumps(body, option=OPTIONS)


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(body), status, headers, media_type=JSON)


class PartsResponse(Response):
    """A body made of several buffers (a JSON header and multi-MB tensors), sent
    one after another with one Content-Length: no copy joins them."""

    def __init__(self, parts: Sequence[bytes], headers: Mapping[str, str], media_type: str,
                 background: BackgroundTask | None = None) -> None:
        super().__init__(b"", 200, dict(headers), media_type, background)
        self.parts = parts
        self.headers["content-length"] = str(sum(len(p) for p in parts))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Sends the parts; the background task (releasing what the body holds) runs
        even when sending fails or the call is cancelled."""
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            parts = [] if scope["method"] == "HEAD" else self.parts
            for i, part in enumerate(parts):
                await send({"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1})
            if not parts:
                await send({"type": "http.response.body", "body": b""})
        finally:
            self.parts = []
            if self.background is not None:
                await self.background()
