"""attention.v1.Tensor <-> numpy: the one dtype table and codec, shared by the
client SDK and the server's converters. Raw little-endian bytes, C order."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import numpy.typing as npt

from ._proto.attention.v1 import attention_pb2 as pb

DTYPES: dict[int, np.dtype[Any]] = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
}
_BY_KIND = {(dt.kind, dt.itemsize): code for code, dt in DTYPES.items()}


class TensorError(ValueError):
    """A Tensor message whose dtype, shape and byte count disagree."""


def dtype_code(dtype: np.dtype[Any] | type) -> int:
    dt = np.dtype(dtype)
    try:
        return _BY_KIND[(dt.kind, dt.itemsize)]
    except KeyError:
        raise TensorError(f"dtype {dt} has no attention.v1.DataType") from None


def to_tensor(array: npt.NDArray[Any], out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode an array (copied once into the message as little-endian bytes)."""
    code = dtype_code(array.dtype)
    le = array.astype(DTYPES[code], copy=False)
    tensor = out if out is not None else pb.Tensor()
    tensor.dtype = cast("pb.DataType.ValueType", code)
    tensor.shape[:] = array.shape
    tensor.data = np.ascontiguousarray(le).tobytes()
    return tensor


def from_tensor(tensor: pb.Tensor) -> npt.NDArray[Any]:
    """Decode without copying (a read-only view of the message's bytes)."""
    if tensor.dtype not in DTYPES:
        raise TensorError(f"unknown tensor dtype {tensor.dtype}")
    dtype = DTYPES[tensor.dtype]
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"negative dimension in shape {shape}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected != len(tensor.data):
        raise TensorError(f"shape {shape} of {dtype} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
