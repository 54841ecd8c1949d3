"""Open Inference Protocol (KServe v2) tensors <-> runtime types.

The model as the protocol sees it (`model_tensors`): inputs `input_ids`,
`attention_mask`, `token_type_ids` (INT64 or INT32, [batch, seq]) or `text`
(BYTES, [batch] or [batch, 1], tokenized by the server); outputs
`last_hidden_state`, `attentions` / `attentions_fp16`, `tokens`,
`sequence_length` and, with a `top_k` parameter, `pair_from_index`,
`pair_to_index`, `pair_strength`. Rows shorter than the batch's longest are
zero-padded in the outputs (`sequence_length` says how long each row is).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from .._proto.inference import grpc_service_pb2 as kpb
from .._proto.inference import model_config_pb2 as mc
from ..errors import FieldPath, InvalidArgument, quote, render_path
from ..runtime.types import FLOAT16, FLOAT32, AnalyzeOptions, ModelMetadata, SequenceInput, SequenceOutput

NUMPY = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
CONFIG_TYPE = {"INT32": mc.TYPE_INT32, "INT64": mc.TYPE_INT64, "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32,
               "BYTES": mc.TYPE_STRING}
TYPED_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
               "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
               "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
               "FP64": "fp64_contents", "BYTES": "bytes_contents"}

ID_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_DIMS = 8
# `layers` / `heads` parameters: comma-separated indices, at most this long.
MAX_INDEX_LIST_CHARS = 1024
TEXT = "text"
PAIR_OUTPUTS = ("pair_from_index", "pair_to_index", "pair_strength")
DEFAULT_OUTPUTS = ("last_hidden_state", "attentions", "tokens", "sequence_length")
# Triton's shared-memory extension: a tensor's parameters name a registered region.
SHM_REGION = "shared_memory_region"
SHM_BYTE_SIZE = "shared_memory_byte_size"
SHM_OFFSET = "shared_memory_offset"
# A BYTES element read from shared memory: its 4-byte length, then at most 4 UTF-8 bytes a character.
UTF8_MAX = 4


@dataclass(frozen=True)
class SharedRef:
    """Where a tensor's bytes are: `byte_size` bytes at `offset` of a registered region."""

    region: str
    offset: int
    byte_size: int


# Reads a tensor's bytes from shared memory: (where, the tensor's field name) -> its bytes.
SharedReader = Callable[[SharedRef, str], bytes]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # with the batch dimension first (-1: variable)
    optional: bool = False


def model_tensors(meta: ModelMetadata) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """What the model takes and returns. The layer and head axes follow the `layers` and
    `heads` parameters (all of the model's by default), so they are declared variable (-1)."""
    layers = heads = -1
    # token_type_ids only for models that take them (BERT; not RoBERTa, GPT-2, Llama).
    inputs = [TensorSpec(name, "INT64", (-1, -1), optional=True) for name in ID_INPUTS
              if name != "token_type_ids" or name in meta.inputs]
    inputs.append(TensorSpec(TEXT, "BYTES", (-1, 1), optional=True))
    outputs = [
        TensorSpec("last_hidden_state", "FP32", (-1, -1, meta.hidden_size)),
        TensorSpec("attentions", "FP32", (-1, layers, heads, -1, -1)),
        TensorSpec("attentions_fp16", "FP16", (-1, layers, heads, -1, -1)),
        TensorSpec("tokens", "BYTES", (-1, -1)),
        TensorSpec("sequence_length", "INT64", (-1,)),
        TensorSpec("pair_from_index", "INT32", (-1, layers, heads, -1)),
        TensorSpec("pair_to_index", "INT32", (-1, layers, heads, -1)),
        TensorSpec("pair_strength", "FP32", (-1, layers, heads, -1)),
    ]
    return inputs, outputs


# -- errors ----------------------------------------------------------------------------------

def field_name(path: FieldPath) -> str:
    """A request field as this protocol names it: the runtime's ("sequences", 2, "text") is
    the `text` input's row 2, ("options", "top_k") the `top_k` parameter."""
    match path:
        case ("sequences", int(row), "text" | "text_pair", *_):
            return f"input 'text'[{row}]"
        case ("sequences", int(row), "token_ids", kind, *rest):
            name = "input_ids" if kind == "ids" else "token_type_ids"
            return f"input '{name}'[{', '.join(str(p) for p in (row, *rest))}]"
        case ("sequences", *_):
            return "inputs"
        case ("options", str(name), *rest):
            return f"parameter '{name}'" + "".join(f"[{p}]" for p in rest)
    return render_path(path)


# -- BYTES --------------------------------------------------------------------------------

def decode_bytes(raw: bytes, name: str, limit: int | None = None) -> list[bytes]:
    """BYTES tensor contents: each element a 4-byte little-endian length, then the bytes.
    With `limit` (the shape's element count), contents holding more elements are refused
    once one more is found, not after all of them are split (4 M empty strings in 16 MiB)."""
    out: list[bytes] = []
    pos = 0
    view = memoryview(raw)
    while pos < len(raw):
        if limit is not None and len(out) >= limit:
            raise InvalidArgument(f"input '{name}'", f"BYTES contents hold more than the shape's {limit} elements")
        if pos + 4 > len(raw):
            raise InvalidArgument(f"input '{name}'", "BYTES contents end inside a 4-byte length prefix")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise InvalidArgument(f"input '{name}'", f"BYTES element of {size} bytes runs past the end of the data")
        out.append(bytes(view[pos:pos + size]))
        pos += size
    return out


def encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


# -- inputs ---------------------------------------------------------------------------------

def _decode_input(tensor: kpb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray | list[bytes]:
    """One input's contents (`raw`: its raw bytes; None: its typed contents), its shape
    already checked (check_shapes): the element count is bounded before anything is
    split or converted."""
    name, datatype = tensor.name, tensor.datatype
    shape = tuple(int(d) for d in tensor.shape)
    count = math.prod(shape)  # Python ints: a shape like [2**32, 2**32] cannot overflow
    if raw is not None:
        if datatype == "BYTES":
            items = decode_bytes(raw, name, count)
            if len(items) != count:
                raise InvalidArgument(f"input '{name}'", f"shape {list(shape)} needs {count} BYTES elements, "
                                      f"got {len(items)}")
            return items
        dtype = NUMPY.get(datatype)
        if dtype is None:
            raise InvalidArgument(f"input '{name}'", f"unknown datatype {quote(datatype)}")
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(f"input '{name}'", f"shape {list(shape)} of {datatype} needs "
                                  f"{count * dtype.itemsize} bytes, got {len(raw)}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"input '{name}'", f"unknown datatype {quote(datatype)}")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(f"input '{name}'", f"shape {list(shape)} needs {count} elements in "
                              f"contents.{field}, got {len(values)}")
    if datatype == "BYTES":
        return list(values)
    return np.asarray(values, dtype=NUMPY[datatype]).reshape(shape)


def _ids(name: str, value: np.ndarray | list[bytes], datatype: str) -> np.ndarray:
    if datatype not in ("INT64", "INT32") or isinstance(value, list):
        raise InvalidArgument(f"input '{name}'", f"datatype {quote(datatype)} is not accepted; expected INT64 or INT32")
    if value.ndim != 2:
        raise InvalidArgument(f"input '{name}'", f"shape {list(value.shape)} must be [batch, sequence]")
    return value.astype(np.int64)


def check_shapes(request: kpb.ModelInferRequest, meta: ModelMetadata, max_batch_size: int) -> None:
    """The inputs' names and declared shapes against the model and the limits (the batch
    dimension against max_batch_size, input_ids' sequence axis against the positions).
    It reads a few numbers per input and none of their contents, so both transports run
    it before anything is decoded or converted: what passes has at most
    max_batch_size x positions elements an input."""
    known = [t.name for t in model_tensors(meta)[0]]
    shapes: dict[str, list[int]] = {}
    for tensor in request.inputs:
        name = tensor.name
        if name not in known:
            raise InvalidArgument(f"input {quote(name)}", f"unexpected input for model '{meta.name}'; "
                                  f"expected {', '.join(known)}")
        if name in shapes:
            raise InvalidArgument(f"input {quote(name)}", "given twice")
        shape = [int(d) for d in tensor.shape]
        if len(shape) > MAX_DIMS:
            raise InvalidArgument(f"input '{name}'", f"has {len(shape)} dimensions; at most {MAX_DIMS}")
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"input '{name}'", f"shape {shape} has a negative dimension")
        shapes[name] = shape
    if (TEXT in shapes) == ("input_ids" in shapes):
        raise InvalidArgument("inputs", "give either 'input_ids' (with optional 'attention_mask' and "
                              "'token_type_ids') or 'text'")
    if TEXT in shapes:
        extra = [n for n in ID_INPUTS if n in shapes]
        if extra:
            raise InvalidArgument(f"input '{extra[0]}'", "not allowed together with 'text'")
        shape = shapes[TEXT]
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidArgument(f"input '{TEXT}'", f"shape {shape} must be [batch] or [batch, 1]")
        _check_batch(TEXT, shape, max_batch_size)
        return
    ids = shapes["input_ids"]
    for name in ID_INPUTS:
        if name in shapes and len(shapes[name]) != 2:
            raise InvalidArgument(f"input '{name}'", f"shape {shapes[name]} must be [batch, sequence]")
    _check_batch("input_ids", ids, max_batch_size)
    if ids[1] > meta.max_positions:
        raise InvalidArgument("input 'input_ids'", f"shape {ids}: {ids[1]} positions exceed the "
                              f"model's {meta.max_positions}; nothing is truncated, split the input")
    for name in ID_INPUTS[1:]:
        if name in shapes and shapes[name] != ids:
            raise InvalidArgument(f"input '{name}'", f"shape {shapes[name]} must equal input_ids' {ids}")


def _shared_input(tensor: kpb.ModelInferRequest.InferInputTensor, ref: SharedRef, meta: ModelMetadata,
                  max_chars_per_token: int, read: SharedReader | None) -> bytes:
    """An input's bytes from shared memory: its byte size is checked against its shape
    (BYTES: against the most its texts may hold) before anything is read."""
    field = f"input {quote(tensor.name)}"
    if read is None:
        raise InvalidArgument(field, f"parameter '{SHM_REGION}': shared memory is not offered here")
    if tensor.HasField("contents"):
        raise InvalidArgument(field, f"has contents and parameter '{SHM_REGION}'; send one")
    count = math.prod(int(d) for d in tensor.shape)
    if tensor.datatype == "BYTES":
        most = count * (4 + UTF8_MAX * max_chars_per_token * meta.max_positions)
        if ref.byte_size > most:
            raise InvalidArgument(field, f"parameter '{SHM_BYTE_SIZE}' {ref.byte_size} is more than {count} "
                                  f"texts of at most {max_chars_per_token * meta.max_positions} characters can "
                                  f"take ({most} bytes)")
    else:
        dtype = NUMPY.get(tensor.datatype)
        if dtype is None:
            raise InvalidArgument(field, f"unknown datatype {quote(tensor.datatype)}")
        if ref.byte_size != count * dtype.itemsize:
            raise InvalidArgument(field, f"parameter '{SHM_BYTE_SIZE}' {ref.byte_size} does not match shape "
                                  f"{[int(d) for d in tensor.shape]} of {tensor.datatype} "
                                  f"({count * dtype.itemsize} bytes)")
    return read(ref, field)


def decode_request(request: kpb.ModelInferRequest, meta: ModelMetadata, max_batch_size: int,
                   read_shared: SharedReader | None = None, max_chars_per_token: int = 32) -> list[SequenceInput]:
    """The request's rows as sequences; INVALID_ARGUMENT names the tensor. Shapes and
    limits are checked first (check_shapes), contents only then. An input with a
    `shared_memory_region` parameter is read with `read_shared` once its byte size is
    checked; `raw_input_contents` then holds the other inputs' bytes, in order (Triton's
    convention)."""
    refs = [shared_ref(t.parameters, f"input {quote(t.name)}") for t in request.inputs]
    in_message = sum(ref is None for ref in refs)
    if request.raw_input_contents and len(request.raw_input_contents) != in_message:
        raise InvalidArgument("raw_input_contents", f"has {len(request.raw_input_contents)} entries for "
                              f"{in_message} inputs not in shared memory; send one per input or use typed "
                              "contents")
    check_shapes(request, meta, max_batch_size)
    given: dict[str, tuple[np.ndarray | list[bytes], str]] = {}
    raw = iter(request.raw_input_contents)
    for tensor, ref in zip(request.inputs, refs, strict=True):
        if ref is not None:
            contents: bytes | None = _shared_input(tensor, ref, meta, max_chars_per_token, read_shared)
        else:
            contents = next(raw) if request.raw_input_contents else None
        given[tensor.name] = (_decode_input(tensor, contents), tensor.datatype)
    if TEXT in given:
        value, datatype = given[TEXT]
        if datatype != "BYTES" or not isinstance(value, list):
            raise InvalidArgument(f"input '{TEXT}'", f"datatype {quote(datatype)} is not accepted; expected BYTES")
        rows = []
        for i, item in enumerate(value):
            try:
                rows.append(SequenceInput(text=item.decode("utf-8")))
            except UnicodeDecodeError:
                raise InvalidArgument(f"input '{TEXT}'[{i}]", "is not valid UTF-8") from None
        return rows
    ids = _ids("input_ids", *given["input_ids"])
    batch = ids.shape[0]
    mask = np.ones_like(ids)
    if "attention_mask" in given:
        mask = _ids("attention_mask", *given["attention_mask"])
    types = np.zeros_like(ids)
    if "token_type_ids" in given:
        types = _ids("token_type_ids", *given["token_type_ids"])
    rows = []
    for r in range(batch):
        n = int(mask[r].sum())
        if not ((mask[r] == 0) | (mask[r] == 1)).all() or not (mask[r, :n] == 1).all() or n == 0:
            raise InvalidArgument(f"input 'attention_mask'[{r}]", "must be ones then zeros (right padding), "
                                  "with at least one 1")
        rows.append(SequenceInput(token_ids=ids[r, :n], type_ids=types[r, :n]))
    return rows


def _check_batch(name: str, shape: list[int], max_batch_size: int) -> None:
    batch = shape[0]
    if not 1 <= batch <= max_batch_size:
        raise InvalidArgument(f"input '{name}'", f"shape {shape}: a batch of {batch} rows; this server takes 1 to "
                              f"{max_batch_size} per request (max_batch_size)")


def _param(params: object, name: str) -> object | None:
    p = params.get(name) if hasattr(params, "get") else None  # type: ignore[union-attr]
    if p is None:
        return None
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def shared_ref(params: object, field: str) -> SharedRef | None:
    """The shared-memory parameters of an input or a requested output (None: not given).
    `shared_memory_region` and `shared_memory_byte_size` go together; the offset defaults to 0."""
    region, size, offset = (_param(params, name) for name in (SHM_REGION, SHM_BYTE_SIZE, SHM_OFFSET))
    if region is None and size is None and offset is None:
        return None
    if not isinstance(region, str) or not region:
        raise InvalidArgument(field, f"parameter '{SHM_REGION}' must name a registered region (a string), got "
                              f"{quote(region)}")
    values = []
    for name, value, default in ((SHM_BYTE_SIZE, size, None), (SHM_OFFSET, offset, 0)):
        if value is None and default is not None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(field, f"parameter '{name}' must be a non-negative integer with "
                                  f"'{SHM_REGION}', got {quote(value)}")
        values.append(value)
    return SharedRef(region, values[1], values[0])


def output_refs(request: kpb.ModelInferRequest) -> dict[str, SharedRef]:
    """The requested outputs to be written into shared memory, by name."""
    refs = {}
    for output in request.outputs:
        ref = shared_ref(output.parameters, f"output {quote(output.name)}")
        if ref is not None:
            refs[output.name] = ref
    return refs


def _index_list(value: object, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if len(str(value)) > MAX_INDEX_LIST_CHARS:
        raise InvalidArgument(f"parameter '{name}'", f"has {len(str(value))} characters; at most "
                              f"{MAX_INDEX_LIST_CHARS}")
    try:
        return tuple(int(x) for x in str(value).replace(" ", "").split(",") if x != "")
    except ValueError:
        raise InvalidArgument(f"parameter '{name}'", f"must be comma-separated integers, got {quote(value)}") from None


def request_timeout(request: kpb.ModelInferRequest, timeout: float | None) -> float | None:
    """The call's time limit in seconds: the transport's (a gRPC deadline) or the
    `timeout` parameter (microseconds, as Triton's), whichever is sooner."""
    micros = _param(request.parameters, "timeout")
    if micros is None:
        return timeout
    if isinstance(micros, bool) or not isinstance(micros, int) or micros < 0:
        raise InvalidArgument("parameter 'timeout'", f"must be a non-negative integer (microseconds), got "
                              f"{quote(micros)}")
    if micros == 0:
        return timeout
    return micros / 1e6 if timeout is None else min(timeout, micros / 1e6)


def requested_outputs(request: kpb.ModelInferRequest, meta: ModelMetadata) -> tuple[list[str], AnalyzeOptions]:
    """The output names in response order, and the runtime options they need."""
    known = [t.name for t in model_tensors(meta)[1]]
    top_k = _param(request.parameters, "top_k")
    names = [o.name for o in request.outputs]
    if len(names) > len(known) or len(set(names)) != len(names):
        raise InvalidArgument("outputs", f"{len(names)} requested, {len(set(names))} distinct; ask for each output "
                              f"at most once (this model has {len(known)})")
    for name in names:
        if name not in known:
            raise InvalidArgument(f"output {quote(name)}", f"unknown output of model '{meta.name}'; known: "
                                  f"{', '.join(known)}")
    if not names:
        names = list(DEFAULT_OUTPUTS) + (list(PAIR_OUTPUTS) if top_k is not None else [])
    if any(n in PAIR_OUTPUTS for n in names) and top_k is None:
        raise InvalidArgument("parameter 'top_k'", "is required for the pair_* outputs")
    if "attentions" in names and "attentions_fp16" in names:
        raise InvalidArgument("outputs", "ask for 'attentions' or 'attentions_fp16', not both")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise InvalidArgument("parameter 'top_k'", f"must be an integer, got {quote(top_k)}")
    min_strength = _param(request.parameters, "min_strength")
    exclude = _param(request.parameters, "exclude_special_tokens")
    options = AnalyzeOptions(
        layers=_index_list(_param(request.parameters, "layers"), "layers"),
        heads=_index_list(_param(request.parameters, "heads"), "heads"),
        attention_dtype=FLOAT16 if "attentions_fp16" in names else FLOAT32,
        attention="attentions" in names or "attentions_fp16" in names,
        hidden_states="last_hidden_state" in names,
        top_k=top_k if top_k is None else int(top_k),
        min_strength=float(min_strength) if isinstance(min_strength, int | float) else 0.0,
        exclude_special_tokens=bool(exclude) if exclude is not None else False,
    )
    return names, options


# -- outputs --------------------------------------------------------------------------------

def _pad_stack(arrays: list[np.ndarray], length: int, axes: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Stack per-row arrays into [batch, ...], padding the given axes to `length`."""
    first = arrays[0]
    shape = [len(arrays), *first.shape]
    for axis in axes:
        shape[axis + 1] = length
    out = np.full(shape, fill, dtype=first.dtype)
    for row, array in enumerate(arrays):
        index: tuple[int | slice, ...] = (row, *(slice(0, d) for d in array.shape))
        out[index] = array
    return out


def padded_length(request: kpb.ModelInferRequest) -> int:
    """The sequence axis the caller sent (input_ids' second dimension), 0 for text."""
    for tensor in request.inputs:
        if tensor.name == "input_ids" and len(tensor.shape) == 2:
            return int(tensor.shape[1])
    return 0


def response_bytes(request: kpb.ModelInferRequest, meta: ModelMetadata, names: list[str], lengths: list[int],
                   layers: int, heads: int, top_k: int | None) -> int:
    """Size of the response `encode_response` will build (outputs are padded to
    the request's sequence axis, so a short row can cost as much as a long one)."""
    batch = len(lengths)
    length = max(padded_length(request), *lengths)
    pairs = batch * layers * heads * min(top_k or 0, max(n * n for n in lengths))
    per_output = {
        "last_hidden_state": batch * length * meta.hidden_size * 4,
        "attentions": batch * layers * heads * length * length * 4,
        "attentions_fp16": batch * layers * heads * length * length * 2,
        "tokens": batch * length * 24,
        "sequence_length": batch * 8,
        "pair_from_index": pairs * 4, "pair_to_index": pairs * 4, "pair_strength": pairs * 4,
    }
    return 1024 + sum(per_output.get(name, 0) for name in names)


def output_shape(name: str, meta: ModelMetadata, length: int, lengths: list[int], layers: int, heads: int,
                 top_k: int | None) -> tuple[str, list[int]] | None:
    """The datatype and exact shape `encode_response` gives a numeric output (None for
    BYTES, whose size follows its contents), so that a shared-memory region can be
    checked against it before anything is computed."""
    batch = len(lengths)
    k = min(top_k or 0, max(n * n for n in lengths))
    shapes = {
        "last_hidden_state": ("FP32", [batch, length, meta.hidden_size]),
        "attentions": ("FP32", [batch, layers, heads, length, length]),
        "attentions_fp16": ("FP16", [batch, layers, heads, length, length]),
        "sequence_length": ("INT64", [batch]),
        "pair_from_index": ("INT32", [batch, layers, heads, k]),
        "pair_to_index": ("INT32", [batch, layers, heads, k]),
        "pair_strength": ("FP32", [batch, layers, heads, k]),
    }
    return shapes.get(name)


def _write_shared(array: np.ndarray | list[np.ndarray], shape: list[int], write: Callable[[list[np.ndarray]], None]
                  ) -> None:
    """Rows (one array each, or the whole tensor) to shared memory in row-major order,
    padded with zeros to `shape`: a row of full length goes as it is, with no copy."""
    rows = array if isinstance(array, list) else [array]
    parts: list[np.ndarray] = []
    for row in rows:
        want = shape[1:] if isinstance(array, list) else shape
        row = np.ascontiguousarray(row, dtype=row.dtype.newbyteorder("<"))
        if list(row.shape) != want:
            padded = np.zeros(want, dtype=row.dtype)
            padded[tuple(slice(0, d) for d in row.shape)] = row
            row = padded
        parts.append(row)
    write(parts)


SharedWriter = Callable[[str, SharedRef, list[np.ndarray]], None]


def encode_response(request: kpb.ModelInferRequest, meta: ModelMetadata, names: list[str],
                    results: list[SequenceOutput], top_k: int | None,
                    shared: dict[str, SharedRef] | None = None,
                    write_shared: SharedWriter | None = None) -> kpb.ModelInferResponse:
    """Outputs padded to the request's own sequence axis (as an ONNX BERT model
    behind Triton would return them), or to the longest text. An output in `shared`
    is written into its region with `write_shared` (raw little-endian, row-major, as
    Triton writes it): the response carries its name, datatype, shape and
    shared-memory parameters, and empty raw contents (one entry per output, as Triton)."""
    response = kpb.ModelInferResponse(model_name=meta.name, model_version="1", id=request.id)
    length = max(padded_length(request), *(len(r.tokens) for r in results))
    shared = shared or {}
    for name in names:
        ref = shared.get(name)
        if ref is not None and write_shared is not None:
            _encode_shared(response, name, results, length, top_k, ref, partial(write_shared, name, ref))
            continue
        if name == "last_hidden_state":
            array = _pad_stack([r.hidden_states for r in results], length, (0,))  # type: ignore[misc]
        elif name in ("attentions", "attentions_fp16"):
            array = _pad_stack([r.attention for r in results], length, (2, 3))  # type: ignore[misc]
        elif name == "sequence_length":
            array = np.array([len(r.tokens) for r in results], dtype=np.int64)
        elif name == "tokens":
            response.outputs.add(name=name, datatype="BYTES", shape=[len(results), length])
            response.raw_output_contents.append(_tokens(results, length))
            continue
        else:
            array = _pairs(results, name, top_k or 0)
        datatype = next(k for k, v in NUMPY.items() if v == array.dtype.newbyteorder("<") and k != "BOOL")
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
                                            .tobytes())
    return response


def _tokens(results: list[SequenceOutput], length: int) -> bytes:
    texts = [[t.encode() for t in r.tokens.texts] + [b""] * (length - len(r.tokens)) for r in results]
    return encode_bytes([t for row in texts for t in row])


def _encode_shared(response: kpb.ModelInferResponse, name: str, results: list[SequenceOutput], length: int,
                   top_k: int | None, ref: SharedRef, write: Callable[[list[np.ndarray]], None]) -> None:
    """One output written into shared memory, its metadata into the response. The
    per-row arrays go out as they are when no padding is needed: no stacked copy."""
    rows: np.ndarray | list[np.ndarray]
    if name in ("last_hidden_state", "attentions", "attentions_fp16"):
        arrays = [r.hidden_states if name == "last_hidden_state" else r.attention for r in results]
        rows = [a for a in arrays if a is not None]
        shape = [len(results), *rows[0].shape]
        for axis in ((0,) if name == "last_hidden_state" else (2, 3)):
            shape[axis + 1] = length
    elif name == "sequence_length":
        rows = np.array([len(r.tokens) for r in results], dtype=np.int64)
        shape = list(rows.shape)
    elif name == "tokens":
        raw = _tokens(results, length)  # its size follows its contents: `write` checks it against the region
        write([np.frombuffer(raw, dtype=np.uint8)])
        _shared_output(response, name, "BYTES", [len(results), length], ref, len(raw))
        return
    else:
        rows = _pairs(results, name, top_k or 0)
        shape = list(rows.shape)
    dtype = (rows[0] if isinstance(rows, list) else rows).dtype
    datatype = next(k for k, v in NUMPY.items() if v == dtype.newbyteorder("<") and k != "BOOL")
    _write_shared(rows, shape, write)
    _shared_output(response, name, datatype, shape, ref, math.prod(shape) * dtype.itemsize)


def _shared_output(response: kpb.ModelInferResponse, name: str, datatype: str, shape: list[int],
                   ref: SharedRef, nbytes: int) -> None:
    """The output's metadata; `shared_memory_byte_size`: the bytes written into the region."""
    output = response.outputs.add(name=name, datatype=datatype, shape=shape)
    output.parameters[SHM_REGION].string_param = ref.region
    output.parameters[SHM_BYTE_SIZE].int64_param = nbytes
    if ref.offset:
        output.parameters[SHM_OFFSET].int64_param = ref.offset
    response.raw_output_contents.append(b"")


def _pairs(results: list[SequenceOutput], name: str, k: int) -> np.ndarray:
    """[batch, layers, heads, k'] with k' = min(top_k, most pairs a row has): a
    top_k beyond the pairs that exist adds no columns."""
    first = results[0]
    k = min(k, max(len(r.tokens) ** 2 for r in results))
    shape = (len(results), len(first.layers), len(first.heads), k)
    out = np.full(shape, 0.0 if name == "pair_strength" else -1,
                  dtype=np.float32 if name == "pair_strength" else np.int32)
    field = {"pair_from_index": "from_index", "pair_to_index": "to_index", "pair_strength": "strength"}[name]
    for row, result in enumerate(results):
        table = result.pairs
        if table is None:
            continue
        values = getattr(table, field).reshape(shape[1], shape[2], -1)
        valid = np.arange(values.shape[-1])[None, None, :] < table.counts.reshape(shape[1], shape[2], 1)
        width = min(k, values.shape[-1])
        out[row, :, :, :width] = np.where(valid[..., :width], values[..., :width], out[row, :, :, :width])
    return out


def tensor_metadata(specs: list[TensorSpec]) -> list[kpb.ModelMetadataResponse.TensorMetadata]:
    return [kpb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape))
            for s in specs]


def model_config(meta: ModelMetadata, max_batch_size: int, instances: int,
                 max_queue_delay_us: int) -> mc.ModelConfig:
    """Triton's view of the model; dims leave out the batch dimension."""
    inputs, outputs = model_tensors(meta)
    return mc.ModelConfig(
        name=meta.name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=max_batch_size,
        input=[mc.ModelInput(name=s.name, data_type=CONFIG_TYPE[s.datatype], dims=list(s.shape[1:]),
                             optional=s.optional) for s in inputs],
        output=[mc.ModelOutput(name=s.name, data_type=CONFIG_TYPE[s.datatype], dims=list(s.shape[1:]))
                for s in outputs],
        instance_group=[mc.ModelInstanceGroup(name=meta.name, count=instances,
                                              kind=mc.ModelInstanceGroup.KIND_CPU)],
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=max_queue_delay_us),
        parameters={k: mc.ModelParameter(string_value=v) for k, v in model_parameters(meta).items()},
    )


def model_parameters(meta: ModelMetadata) -> dict[str, str]:
    """What attention.v1's ModelInfo says of the model beyond its tensors, as Triton's
    string-valued model parameters."""
    def flag(value: bool) -> str:
        return "true" if value else "false"

    return {
        "architecture": meta.architecture,
        "model_type": meta.model_type,
        "causal": flag(meta.causal),
        "num_layers": str(meta.num_layers),
        "num_heads": str(meta.num_heads),
        "num_key_value_heads": str(meta.num_key_value_heads),
        "kv_heads": ",".join(str(meta.kv_head(h)) for h in range(meta.num_heads)),
        "head_dim": str(meta.head_dim),
        "position_embedding": meta.position_embedding,
        "special_tokens": ",".join(f"{name}={int(token['id'])}" for name, token in sorted(meta.special_tokens.items())),
        "supports_hidden_states_layers": flag(bool(meta.hidden_states_outputs)),
        "supports_query_key": flag(bool(meta.query_outputs)),
        "query_key_scaling": ",".join(f"{meta.scaling(layer):.9g}" for layer in range(meta.num_layers)),
    }
