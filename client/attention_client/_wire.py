"""Zero-copy decoding of Analyze responses.

Protobuf would copy each tensor's bytes twice (into the parsed message, then
into a new bytes object on access). Here the response bytes are scanned once:
tensor fields become read-only numpy views into the received buffer; every other
field is parsed by protobuf from a small copy without the tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from ._proto.attention.v1 import attention_pb2 as pb
from .tensors import DTYPES, TensorError

_RESULT = pb.SequenceResult.DESCRIPTOR
TENSOR_FIELDS = {f.number: f.name for f in _RESULT.fields if f.message_type is pb.Tensor.DESCRIPTOR}
RESULTS_FIELD = pb.AnalyzeResponse.DESCRIPTOR.fields_by_name["results"].number


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise TensorError("truncated varint in response")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, value start, value end, varint value or 0) of a message's fields."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, after = _varint(buf, pos)
            yield number, wire, pos, after, value
            pos = after
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise TensorError("field runs past the end of its message")
            yield number, wire, pos, pos + size, 0
            pos += size
        elif wire == 1:
            yield number, wire, pos, pos + 8, 0
            pos += 8
        elif wire == 5:
            yield number, wire, pos, pos + 4, 0
            pos += 4
        else:
            raise TensorError(f"unsupported wire type {wire} in response")
    if pos != end:
        raise TensorError("field runs past the end of its message")


def _tensor(raw: bytes, buf: memoryview, start: int, end: int) -> npt.NDArray[Any]:
    dtype_code, shape, data = 0, list[int](), (start, start)
    for number, wire, a, b, value in _fields(buf, start, end):
        if number == 1 and wire == 0:
            dtype_code = value
        elif number == 2 and wire == 2:  # packed shape
            pos = a
            while pos < b:
                dim, pos = _varint(buf, pos)
                shape.append(dim)
        elif number == 2 and wire == 0:
            shape.append(value)
        elif number == 3 and wire == 2:
            data = (a, b)
    dtype = DTYPES.get(dtype_code)
    if dtype is None:
        raise TensorError(f"unknown tensor dtype {dtype_code}")
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize != data[1] - data[0]:
        raise TensorError(f"shape {shape} of {dtype} needs {count * dtype.itemsize} bytes, got {data[1] - data[0]}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=data[0]).reshape(shape)


def split_result(raw: bytes, start: int = 0,
                 end: int | None = None) -> tuple[pb.SequenceResult, dict[str, npt.NDArray[Any]]]:
    """A SequenceResult without its tensors (parsed) and its tensors (views into raw)."""
    buf = memoryview(raw)
    end = len(raw) if end is None else end
    rest = bytearray()
    tensors: dict[str, npt.NDArray[Any]] = {}
    pos = start
    for number, wire, a, b, _ in _fields(buf, start, end):
        name = TENSOR_FIELDS.get(number)
        if name is not None and wire == 2:
            tensors[name] = _tensor(raw, buf, a, b)
        else:
            rest += buf[pos:b]  # key, length and value, as they were
        pos = b
    return pb.SequenceResult.FromString(bytes(rest)), tensors


def split_response(raw: bytes) -> list[tuple[pb.SequenceResult, dict[str, npt.NDArray[Any]]]]:
    """Every result of an AnalyzeResponse, as split_result gives them."""
    buf = memoryview(raw)
    return [split_result(raw, a, b) for number, wire, a, b, _ in _fields(buf, 0, len(raw))
            if number == RESULTS_FIELD and wire == 2]
