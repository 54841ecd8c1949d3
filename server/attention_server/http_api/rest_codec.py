"""The Open Inference Protocol's REST body <-> its messages
(inference/grpc_service.proto), so both transports share one implementation
(services/inference.py). JSON tensors (`data`) and Triton's binary tensor data
extension: a JSON header of `Inference-Header-Content-Length` bytes followed by
the tensors' raw bytes, each input's and output's size in its
`parameters.binary_data_size`. (Compressed bodies are inflated by body.py first.)

Every value a caller sends is checked for its JSON type here and named by its
path (`inputs[0].shape`); what the values mean (datatypes, shapes against
contents, limits) is checked by services/oip_codec.py, as for gRPC. The inputs'
shapes are checked against the model and the limits (`check`) before any
tensor's data is converted: the work a body causes follows what its shapes may
hold, never how many elements it sends."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from .._proto.inference import grpc_service_pb2 as kpb
from ..errors import FieldPath, InvalidArgument, quote
from ..services.oip_codec import MAX_DIMS, NUMPY, SHM_BYTE_SIZE, SHM_OFFSET, SHM_REGION, decode_bytes, encode_bytes
from .body import loads

HEADER_LENGTH = "inference-header-content-length"
BINARY_SIZE = "binary_data_size"
BINARY = "binary_data"
BINARY_OUTPUT = "binary_data_output"
# Parameters that describe the transport, not the inference: never passed on.
TRANSPORT_PARAMETERS = (BINARY_SIZE, BINARY, BINARY_OUTPUT)
# Triton extensions this server does not offer: refused by name rather than ignored
# (the caller would otherwise look for a classification it never gets).
UNSUPPORTED_PARAMETERS = {
    "classification": "the classification extension is not offered; ask for the tensor itself",
}
# Without --shared-memory the same (the caller would look for its tensors in a region).
SHARED_MEMORY_OFF = {
    SHM_REGION: "shared memory is not offered: this server runs without --shared-memory; send the tensor in "
                "the body",
}
MAX_PARAMETERS = 64
MAX_INPUTS = 16
MAX_OUTPUTS = 16
MAX_NAME_CHARS = 256
# Nested `data` lists deeper than this are refused (a tensor has at most MAX_DIMS).
MAX_DATA_DEPTH = 32
# `data` with more elements (or lists) than its shape's count and this many is refused
# before any element is converted; within it, the conversion names the exact mismatch.
DATA_SLACK = 1024
INT64 = (-(1 << 63), (1 << 63) - 1)
# How many times larger a JSON tensor is than its raw bytes, at most (a float32 as
# `-0.0012345678,` is 14 characters), for the response size limit.
JSON_SIZE_FACTOR = 4.0
_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


@dataclass
class RestRequest:
    message: kpb.ModelInferRequest
    binary_outputs: dict[str, bool]  # output name -> wanted as binary data
    binary_by_default: bool  # for outputs not named: `binary_data_output`
    shared_outputs: frozenset[str] = frozenset()  # written into shared memory: not in the reply

    def size_factor(self) -> float:
        """1 when every output the reply will carry is binary data, else JSON's factor."""
        named = {k: v for k, v in self.binary_outputs.items() if k not in self.shared_outputs}
        if self.binary_outputs and not named:
            return 1.0
        if all(named.values()) if named else self.binary_by_default:
            return 1.0
        return JSON_SIZE_FACTOR


def _type(value: Any, kind: type, path: FieldPath, what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidArgument(path, f"must be {what}, got {quote(value)}")
    return value


def _name(value: Any, path: FieldPath) -> str:
    name: str = _type(value, str, path, "a string")
    if not name or len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(path, f"must have 1 to {MAX_NAME_CHARS} characters")
    return name


def _parameters(value: Any, target: Any, path: FieldPath, shared_memory: bool = False) -> dict[str, Any]:
    """JSON parameters into a map of InferParameter; returns the transport ones. The
    shared-memory parameters are refused by name unless `shared_memory` is on."""
    if value is None:
        return {}
    params: dict[str, Any] = _type(value, dict, path, "an object")
    if len(params) > MAX_PARAMETERS:
        raise InvalidArgument(path, f"has {len(params)} entries; at most {MAX_PARAMETERS}")
    transport = {}
    for key, item in params.items():
        where = (*path, key)
        if len(key) > MAX_NAME_CHARS:
            raise InvalidArgument(path, f"a key has {len(key)} characters; at most {MAX_NAME_CHARS}")
        if key in UNSUPPORTED_PARAMETERS:
            raise InvalidArgument(where, UNSUPPORTED_PARAMETERS[key])
        if key in SHARED_MEMORY_OFF and not shared_memory:
            raise InvalidArgument(where, SHARED_MEMORY_OFF[key])
        if key in TRANSPORT_PARAMETERS:
            transport[key] = item
            continue
        if isinstance(item, bool):
            target[key].bool_param = item
        elif isinstance(item, int):
            if not INT64[0] <= item <= INT64[1]:
                raise InvalidArgument(where, "is out of the 64-bit integer range")
            target[key].int64_param = item
        elif isinstance(item, float):
            target[key].double_param = item
        elif isinstance(item, str):
            target[key].string_param = item
        else:
            raise InvalidArgument(where, f"must be a boolean, a number or a string, got {quote(item)}")
    return transport


def _flag(flags: dict[str, Any], key: str, path: FieldPath, default: bool) -> bool:
    value = flags.get(key, default)
    return bool(_type(value, bool, (*path, key), "true or false"))


def _shape(value: Any, path: FieldPath) -> list[int]:
    shape: list[Any] = _type(value, list, path, "a list of integers")
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(path, f"has {len(shape)} dimensions; at most {MAX_DIMS}")
    for i, d in enumerate(shape):
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= INT64[1]:
            raise InvalidArgument((*path, i), f"must be a non-negative integer, got {quote(d)}")
    return shape


def _check_size(data: Any, shape: list[int], path: FieldPath) -> None:
    """Refuse `data` holding far more than its shape's elements before any is converted.
    The walk visits lists, not their elements (an innermost list counts by its length),
    and stops once past the count and DATA_SLACK: its cost follows the shape, whatever
    the body holds."""
    count = math.prod(shape)
    cap = count + DATA_SLACK
    elements = lists = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, list):
            elements += 1
        else:
            lists += 1
            if depth >= MAX_DATA_DEPTH:
                raise InvalidArgument(path, f"is nested deeper than {MAX_DATA_DEPTH} lists")
            if len(item) > cap:
                elements = len(item)
            elif item and isinstance(item[0], list):
                stack.extend((child, depth + 1) for child in item)
            else:
                elements += len(item)
        if elements > cap or lists > cap:
            raise InvalidArgument(path, f"has more than {cap} elements or lists; shape {shape} needs {count} "
                                  "elements")


def _flatten_strings(data: Any, path: FieldPath, limit: int) -> list[bytes]:
    """The strings of a (nested) list in row-major order, without recursion (the
    nesting is the caller's)."""
    out: list[bytes] = []
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if len(out) >= limit:
                raise InvalidArgument(path, f"has more elements than its shape's {limit}")
            out.append(item.encode())
        elif isinstance(item, list):
            if depth >= MAX_DATA_DEPTH:
                raise InvalidArgument(path, f"is nested deeper than {MAX_DATA_DEPTH} lists")
            stack.extend((child, depth + 1) for child in reversed(item))
        else:
            raise InvalidArgument(path, f"BYTES data must be strings, got {quote(item)}")
    return out


def _json_data(data: Any, datatype: str, shape: list[int], path: FieldPath) -> bytes:
    """A JSON `data` array (flat or nested, row-major) as the tensor's raw bytes."""
    _check_size(data, shape, path)
    count = math.prod(shape)
    if datatype == "BYTES":
        items = _flatten_strings(data, path, count)
        if len(items) != count:
            raise InvalidArgument(path, f"has {len(items)} elements; shape {shape} needs {count}")
        return encode_bytes(items)
    dtype = NUMPY.get(datatype)
    if dtype is None:
        raise InvalidArgument(path, f"unknown datatype {quote(datatype)}")
    _type(data, list, path, "a list")
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument(path, f"must be a (nested) list of {datatype} numbers of one shape") from None
    if array.size != count:
        raise InvalidArgument(path, f"has {array.size} elements; shape {shape} needs {count}")
    if count and array.dtype.kind not in _KINDS.get(dtype.kind, ""):
        raise InvalidArgument(path, f"must hold {datatype} values, got {array.dtype.name} values")
    if dtype.kind in "iu" and count:
        info = np.iinfo(dtype.type)  # type: ignore[type-var]  # an integer dtype here
        if array.min() < info.min or array.max() > info.max:
            raise InvalidArgument(path, f"has values outside the {datatype} range")
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _header_length(value: str | None, size: int) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and int(text) <= size):
        raise InvalidArgument("Inference-Header-Content-Length", f"must be an integer from 0 to the body's "
                              f"{size} bytes, got {quote(value)}")
    return int(text)


def decode(body: bytes, header_length: str | None, model: str, version: str,
           check: Callable[[kpb.ModelInferRequest], None] | None = None, shared_memory: bool = False) -> RestRequest:
    """A REST inference request body as a ModelInferRequest (all inputs as raw contents,
    but those in shared memory, which keep their shared-memory parameters, as over gRPC).
    `check` sees the message with its inputs' names, datatypes and shapes but no contents
    yet (services.oip_codec.check_shapes: the batch dimension and the positions against
    the limits), before any tensor data is copied or converted. `shared_memory`: the
    server offers Triton's shared-memory parameters (else they are refused by name)."""
    n = _header_length(header_length, len(body))
    header, binary = (body, memoryview(b"")) if n is None else (body[:n], memoryview(body)[n:])
    doc = loads(header)
    _type(doc, dict, ("body",), "a JSON object")
    message = kpb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in doc:
        message.id = _type(doc["id"], str, ("id",), "a string")
    transport = _parameters(doc.get("parameters"), message.parameters, ("parameters",))
    inputs = _type(doc.get("inputs"), list, ("inputs",), "a list of input tensors")
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise InvalidArgument("inputs", f"has {len(inputs)} tensors; give 1 to {MAX_INPUTS}")
    offset = 0
    contents: list[tuple[FieldPath, slice | None]] = []  # each input's binary bytes, or None: JSON data
    for i, tensor in enumerate(inputs):
        where: FieldPath = ("inputs", i)
        _type(tensor, dict, where, "an object")
        name = _name(tensor.get("name"), (*where, "name"))
        datatype = _name(tensor.get("datatype"), (*where, "datatype"))
        shape = _shape(tensor.get("shape"), (*where, "shape"))
        entry = message.inputs.add(name=name, datatype=datatype, shape=shape)
        sizes = _parameters(tensor.get("parameters"), entry.parameters, (*where, "parameters"), shared_memory)
        size = sizes.get(BINARY_SIZE)
        if SHM_REGION in entry.parameters:
            if size is not None or "data" in tensor:
                raise InvalidArgument(where, f"has parameters.{SHM_REGION} and also "
                                      f"{'data' if 'data' in tensor else 'parameters.' + BINARY_SIZE}; send one")
            continue  # read from the region by the service, after the shapes are checked
        if size is not None:
            if "data" in tensor:
                raise InvalidArgument(where, "has both data and parameters.binary_data_size; send one")
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
                raise InvalidArgument((*where, "parameters", BINARY_SIZE), f"must be an integer within the "
                                      f"{len(binary) - offset} binary bytes left, got {quote(size)}")
            contents.append((where, slice(offset, offset + size)))
            offset += size
        elif "data" in tensor:
            contents.append((where, None))
        else:
            raise InvalidArgument(where, "has neither data nor parameters.binary_data_size")
    if offset != len(binary):
        raise InvalidArgument("body", f"{len(binary) - offset} binary bytes after the inputs' binary_data_size "
                              "total")
    if check is not None:
        check(message)
    in_body = [(tensor, entry) for tensor, entry in zip(inputs, message.inputs, strict=True)
               if SHM_REGION not in entry.parameters]
    for (where, part), (tensor, entry) in zip(contents, in_body, strict=True):
        if part is not None:
            message.raw_input_contents.append(bytes(binary[part]))
        else:
            message.raw_input_contents.append(_json_data(tensor["data"], entry.datatype, list(entry.shape),
                                                         (*where, "data")))
    binary_by_default = _flag(transport, BINARY_OUTPUT, ("parameters",), False)
    binary_outputs: dict[str, bool] = {}
    outputs = doc.get("outputs")
    if outputs is not None:
        _type(outputs, list, ("outputs",), "a list")
        if len(outputs) > MAX_OUTPUTS:
            raise InvalidArgument("outputs", f"has {len(outputs)} entries; at most {MAX_OUTPUTS}")
        for i, output in enumerate(outputs):
            where = ("outputs", i)
            _type(output, dict, where, "an object")
            name = _name(output.get("name"), (*where, "name"))
            if name in binary_outputs:
                raise InvalidArgument((*where, "name"), f"output {quote(name)} is asked for twice")
            wanted = message.outputs.add(name=name)
            flags = _parameters(output.get("parameters"), wanted.parameters, (*where, "parameters"), shared_memory)
            binary_outputs[name] = _flag(flags, BINARY, (*where, "parameters"), binary_by_default)
    shared = frozenset(o.name for o in message.outputs if SHM_REGION in o.parameters)
    return RestRequest(message, binary_outputs, binary_by_default, shared)


def encode(response: kpb.ModelInferResponse, request: RestRequest) -> tuple[dict[str, Any], list[bytes]]:
    """A ModelInferResponse as the REST JSON document and the binary parts that follow it."""
    outputs: list[dict[str, Any]] = []
    binary: list[bytes] = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if SHM_REGION in tensor.parameters:  # written into shared memory: its parameters, no data
            out["parameters"] = {key: getattr(tensor.parameters[key], tensor.parameters[key].WhichOneof(
                "parameter_choice") or "string_param") for key in (SHM_REGION, SHM_BYTE_SIZE, SHM_OFFSET)
                if key in tensor.parameters}
        elif request.binary_outputs.get(tensor.name, request.binary_by_default):
            out["parameters"] = {BINARY_SIZE: len(raw)}
            binary.append(raw)
        elif tensor.datatype == "BYTES":
            out["data"] = [item.decode(errors="backslashreplace") for item in decode_bytes(raw, tensor.name)]
        else:
            out["data"] = np.frombuffer(raw, dtype=NUMPY[tensor.datatype])
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version,
                           "outputs": outputs}
    if response.id:
        doc["id"] = response.id
    return doc, binary


# -- other responses ------------------------------------------------------------------------

def _value(field: Any, value: Any) -> Any:  # a FieldDescriptor (python's or upb's)
    if field.message_type is not None:
        return document(value)
    if field.enum_type is not None:
        number = field.enum_type.values_by_number.get(value)
        return number.name if number is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def document(message: Message) -> dict[str, Any]:
    """A message as Triton's REST API writes it: the .proto's field names, numbers
    as numbers (64-bit ones too), enums by name, and every field without presence
    at its value, zeros and empty lists included (statistics carry `"count": 0`,
    not no count)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            item = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _value(item, v) for key, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        elif field.has_presence and not message.HasField(field.name):
            continue
        else:
            out[field.name] = _value(field, value)
    return out
