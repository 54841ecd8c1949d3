"""Protobuf messages as JSON documents, two ways:

- `plain`: the field names of the .proto and numbers as numbers (what Triton's
  and KServe's REST APIs return for metadata, configuration and statistics,
  where protobuf's JSON mapping would quote 64-bit integers);
- `mapped` / `parse`: protobuf's own JSON mapping (json_format), for
  attention.v1 over HTTP (lowerCamelCase names, bytes as base64).
"""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ..errors import InvalidArgument


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return plain(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def plain(message: Message) -> dict[str, Any]:
    """The fields that are set, by their .proto names; 64-bit integers stay numbers."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _scalar(value_field, item) for key, item in value.items()}
        elif field.is_repeated:
            out[field.name] = [_scalar(field, item) for item in value]
        else:
            out[field.name] = _scalar(field, value)
    return out


def mapped(message: Message) -> dict[str, Any]:
    """protobuf's JSON mapping of `message`, fields at their default values included
    (a token at offset 0 has `"start": 0`, not no `start`)."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)  # type: ignore[no-any-return]


def parse(body: bytes, message: Message) -> Message:
    """Fill `message` from a JSON body in protobuf's JSON mapping; INVALID_ARGUMENT names what is wrong."""
    try:
        return json_format.Parse(body, message, max_recursion_depth=32)
    except (json_format.ParseError, UnicodeDecodeError, RecursionError) as exc:
        text = " ".join(str(exc).split())[:300]
        raise InvalidArgument("body", f"not a valid {message.DESCRIPTOR.name} in protobuf's JSON mapping: "
                              f"{text}") from None
