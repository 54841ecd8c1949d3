"""Request bodies read within a limit: a declared Content-Length over it is
refused before anything is read, a body that grows over it while being read is
refused at that point (413 either way)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from ..errors import InvalidArgument, TooLarge


def _too_large(limit: int, size: str) -> TooLarge:
    return TooLarge(f"request body of {size} is over the {limit} byte limit (max_request_bytes)")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, f"{int(declared)} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int, allow_empty: bool = False) -> Any:
    """A small JSON body (or None when empty and allowed)."""
    body = await read_body(request, limit)
    if not body.strip() and allow_empty:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument("body", f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
