"""Request bodies read within limits, the same for every route:

- size: a declared Content-Length over the limit is refused before anything is
  read, a body that grows over it while being read is refused at that point
  (413 either way; app.py then closes the connection rather than read the rest);
- compression: a `Content-Encoding: gzip` or `deflate` body (tritonclient.http
  sends them) is inflated in a worker thread, in linear time, to at most the
  same limit, with at most MAX_GZIP_MEMBERS gzip members (one is what clients send);
- time: the whole body must arrive within `http_body_timeout` of its headers
  (app.py bounds every read of it: 408, and the connection is closed).

attention.v1 bodies (`read_analyze_request`) have their counts checked against
the engine's limits before protobuf's JSON mapping converts them element by
element (json_format takes seconds for a few million)."""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any

import orjson
from starlette.requests import Request

from attention_client.protocol import attention_pb2 as pb

from ..errors import InvalidArgument, TooLarge, quote
from ..services.attention import AttentionService
from ..services.converters import check_sequence_count
from .messages import parse

# Content-Encoding -> zlib's wbits (gzip's header, zlib's header: what "deflate" means in HTTP).
ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
# A gzip body may be several members one after the other; clients send one. Each member
# costs a copy of the rest of the body, so their number is what bounds the work.
MAX_GZIP_MEMBERS = 4
MAX_REQUEST_BYTES = "max_request_bytes"
# attention.v1 bodies larger than this are parsed in a worker thread.
INLINE_JSON_BYTES = 1 << 20


def _too_large(limit: int, size: str, setting: str) -> TooLarge:
    return TooLarge(f"request body of {size} is over the {limit} byte limit ({setting})")


async def read_body(request: Request, limit: int, setting: str = MAX_REQUEST_BYTES) -> bytes:
    """The body as the client meant it (inflated if compressed), at most `limit` bytes
    either way; `setting` names the limit in the 413."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, f"{int(declared)} bytes", setting)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, f"more than {limit} bytes", setting)
        chunks.append(chunk)
    body = b"".join(chunks)
    del chunks
    encoding = request.headers.get("content-encoding")
    if encoding is None or encoding.strip().lower() == "identity":
        return body
    return await asyncio.to_thread(decompress, body, encoding, limit, setting)


def decompress(body: bytes, encoding: str | None, limit: int, setting: str = MAX_REQUEST_BYTES) -> bytes:
    """The body as sent before its Content-Encoding; TooLarge as soon as it grows
    over `limit` bytes (a small compressed body can expand a thousandfold)."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    wbits = ENCODINGS.get(name)
    if wbits is None:
        raise InvalidArgument("Content-Encoding", f"{quote(encoding)} is not supported; send gzip, deflate or "
                              "an uncompressed body")
    out: list[bytes] = []
    size = 0
    data = body
    members = 0
    try:
        while data:
            members += 1
            if members > MAX_GZIP_MEMBERS:
                raise InvalidArgument("body", f"{name} data of more than {MAX_GZIP_MEMBERS} members; send one")
            inflater = zlib.decompressobj(wbits)
            # At most limit + 1 bytes out: over that is refused, and under it all input is consumed.
            chunk = inflater.decompress(data, limit + 1 - size)
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"request body is over the {limit} byte limit ({setting}) once decompressed "
                               f"({name}, {len(body)} bytes as sent)")
            out.append(chunk)
            if not inflater.eof:
                raise InvalidArgument("body", f"{name} data ends before its end marker")
            data = inflater.unused_data
            if data and wbits != 31:
                raise InvalidArgument("body", f"{len(data)} bytes after the end of the {name} data")
    except zlib.error as exc:
        raise InvalidArgument("body", f"is not valid {name} data ({exc})") from None
    return b"".join(out)


def loads(body: bytes | memoryview) -> Any:
    """A JSON document; INVALID_ARGUMENT says what is wrong with it, and where."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            bytes(body).decode("utf-8")
        except UnicodeDecodeError as bad:
            raise InvalidArgument("body", f"is not valid JSON (it is not UTF-8: byte {bad.object[bad.start]:#04x} "
                                  f"at position {bad.start})") from None
        raise InvalidArgument("body", f"is not valid JSON ({exc.msg} at character {exc.pos})") from None


async def read_json(request: Request, limit: int, setting: str = MAX_REQUEST_BYTES,
                    allow_empty: bool = False) -> Any:
    """A small JSON body; an empty one (when allowed) is the empty object."""
    body = await read_body(request, limit, setting)
    if allow_empty and not body.strip():
        return {}
    return loads(body)


# -- attention.v1 --------------------------------------------------------------------------

def _field(doc: dict[str, Any], name: str, json_name: str) -> Any:
    """A field of protobuf's JSON mapping, which takes the .proto name or the lowerCamelCase one."""
    return doc.get(json_name, doc.get(name))


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def check_analyze_counts(doc: Any, service: AttentionService) -> None:
    """The repeated fields of an AnalyzeRequest document against the limits the engine
    holds them to, with the engine's messages: sequences, token ids, layers, heads.
    json_format converts these one element at a time (seconds for millions), so they
    are counted first; anything else is left to it and to the engine."""
    if not isinstance(doc, dict):
        return  # json_format names it
    engine = service.engine
    sequences = _field(doc, "sequences", "sequences")
    check_sequence_count(_count(sequences), engine.limits.max_batch_size)
    model = _field(doc, "model", "model")
    meta = engine.repository.get(model if isinstance(model, str) else "").metadata
    options = _field(doc, "options", "options")
    if isinstance(options, dict):
        for name, limit in (("layers", meta.num_layers), ("heads", meta.num_heads)):
            n = _count(options.get(name))
            if n > limit:
                raise InvalidArgument(("options", name), f"lists {n} {name[:-1]}s; model {meta.name!r} has {limit}")
    for i, sequence in enumerate(sequences if isinstance(sequences, list) else ()):
        ids = _field(sequence, "token_ids", "tokenIds") if isinstance(sequence, dict) else None
        if not isinstance(ids, dict):
            continue
        n = _count(_field(ids, "ids", "ids"))
        if n > meta.max_positions:
            raise InvalidArgument(("sequences", i, "token_ids", "ids"), f"{n} token ids exceed the model's "
                                  f"{meta.max_positions} positions; nothing is truncated, split the input")
        types = _count(_field(ids, "type_ids", "typeIds"))
        if types > meta.max_positions:
            raise InvalidArgument(("sequences", i, "token_ids", "type_ids"), f"has {types} entries; must be "
                                  f"empty or match the {n} ids")


def analyze_request(body: bytes, service: AttentionService) -> pb.AnalyzeRequest:
    """An AnalyzeRequest from protobuf's JSON mapping, its counts checked first. The
    document is read as json_format reads it (the standard library's parser, which is
    C), then converted by json_format itself, so what it accepts is unchanged."""
    message = pb.AnalyzeRequest()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        parse(body, message)  # which says so, as it always has
        raise
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # what json_format says, without its slower second try
        problem = " ".join(f"Failed to load JSON: {exc}.".split())[:300]
        raise InvalidArgument("body", f"not a valid AnalyzeRequest in protobuf's JSON mapping: {problem}") from None
    check_analyze_counts(doc, service)
    del doc, text
    parse(body, message)
    return message


async def read_analyze_request(request: Request, limit: int, service: AttentionService) -> pb.AnalyzeRequest:
    """An attention.v1 request body (within `limit` bytes, inflated if compressed) as
    an AnalyzeRequest; parsed off the event loop when large."""
    body = await read_body(request, limit)
    if len(body) <= INLINE_JSON_BYTES:
        return analyze_request(body, service)
    return await asyncio.to_thread(analyze_request, body, service)
