"""Inputs of `attention-client analyze`: texts on the command line, from stdin (`-`)
or a file: one text per line, or JSON lines with `text`, `text_pair` and `id`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, TextIO

from ._cli_output import Item

InputFormat = Literal["auto", "text", "jsonl"]
FORMATS: tuple[InputFormat, ...] = ("auto", "text", "jsonl")


class InputError(ValueError):
    """Input the CLI cannot use; the message names the source and the line."""


def _json_item(line: str, where: str) -> Item:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg}); use --input-format text for plain text") from None
    if not isinstance(value, dict):
        raise InputError(f"{where}: a JSON line must be an object with a \"text\", got {type(value).__name__}")
    text = value.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: \"text\" must be a non-empty string")
    pair = value.get("text_pair")
    if pair is not None and not isinstance(pair, str):
        raise InputError(f"{where}: \"text_pair\" must be a string or null")
    label = value.get("id", "")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise InputError(f"{where}: \"id\" must be a string or an integer")
    return Item(text, pair, str(label))


def _looks_like_json(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def parse_lines(lines: Iterable[str], name: str, fmt: InputFormat = "auto") -> list[Item]:
    """Items of a text stream; blank lines are skipped. "auto": JSON lines when the first
    non-blank line is a JSON object, else one text per line."""
    items: list[Item] = []
    mode = fmt
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if mode == "auto":
            mode = "jsonl" if _looks_like_json(line) else "text"
        items.append(_json_item(line, f"{name}:{number}") if mode == "jsonl" else Item(line))
    return items


def read_source(source: str, stdin: TextIO, fmt: InputFormat) -> list[Item]:
    """Items of a file, or of stdin for '-'."""
    if source == "-":
        return parse_lines(stdin, "<stdin>", fmt)
    path = Path(source)
    try:
        with path.open(encoding="utf-8") as f:
            return parse_lines(f, source, fmt)
    except FileNotFoundError:
        raise InputError(f"--input: no such file: {source}") from None
    except IsADirectoryError:
        raise InputError(f"--input: a directory, not a file: {source}") from None
    except PermissionError:
        raise InputError(f"--input: permission denied: {source}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"--input: {source} is not UTF-8 text (byte {exc.start})") from None


def gather(texts: list[str], input_file: str | None, fmt: InputFormat, text_pair: str | None,
           stdin: TextIO) -> list[Item]:
    """Every input in order: the command line's texts ('-' reads stdin there), then --input."""
    if texts.count("-") + (input_file == "-") > 1:
        raise InputError("stdin ('-') can be read only once")
    items: list[Item] = []
    for text in texts:
        if text == "-":
            items.extend(read_source("-", stdin, fmt))
        elif not text.strip():
            raise InputError("a text on the command line is empty")
        else:
            items.append(Item(text))
    if input_file is not None:
        items.extend(read_source(input_file, stdin, fmt))
    if text_pair is not None:
        if len(items) != 1 or items[0].text_pair is not None:
            raise InputError("--text-pair goes with exactly one text; for several, use JSON lines with "
                             "\"text_pair\"")
        items = [Item(items[0].text, text_pair, items[0].id)]
    if not items:
        raise InputError("no input: give a text, '-' to read texts from stdin, or --input FILE")
    return items
