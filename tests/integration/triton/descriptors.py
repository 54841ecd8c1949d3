"""Field tables of protobuf modules, to compare ours with tritonclient's (each in
its own process: both register the same message names)."""

from __future__ import annotations

from types import ModuleType
from typing import Any


def field_table(*modules: ModuleType) -> dict[str, dict[str, list[Any]]]:
    """{message full name: {field: [number, type, repeated]}} including nested messages."""

    def walk(d: Any) -> dict[str, dict[str, list[Any]]]:
        out = {d.full_name: {f.name: [f.number, f.type, f.is_repeated] for f in d.fields}}
        for nested in d.nested_types:
            out.update(walk(nested))
        return out

    table: dict[str, dict[str, list[Any]]] = {}
    for module in modules:
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            table.update(walk(descriptor))
    return table
