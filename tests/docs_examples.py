"""Examples in Markdown files, and how their shown output is compared with a real run
(used by tests/integration/test_docs.py, whose docstring states the convention).

Only the standard library: reading fences needs no Markdown parser, since the docs
put every fence at the start of a line.
"""

from __future__ import annotations

import difflib
import re
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

SKIP_MARKER = "<!-- docs-test: skip"
"""An HTML comment starting with this, on the line right before a fence, exempts the block."""

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)[^\n]*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its opening and closing fence lines (1-based), language tag and text."""

    path: Path
    line: int
    end: int
    lang: str
    text: str
    skipped: bool


@dataclass(frozen=True)
class Example:
    """Something to run and the output the docs show for it.

    `kind` is "console" (a shell command) or "python" (a program run by the venv's Python)."""

    path: Path
    line: int
    kind: str
    code: str
    expected: str

    def id(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


def _closes(line: str, fence: str) -> bool:
    """A closing fence: only the fence's character, at least as many as opened it."""
    return line.startswith(fence) and not line.strip().strip(fence[0])


def read_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang = match.group(1), match.group(2)
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not _closes(lines[i], fence):
            body.append(lines[i])
            i += 1
        previous = lines[start - 1].strip() if start > 0 else ""
        blocks.append(Block(path, start + 1, i + 1, lang, "\n".join(body), previous.startswith(SKIP_MARKER)))
        i += 1
    return blocks


def _gap_is_blank(lines: list[str], after: Block, before: Block) -> bool:
    """Only blank lines between the closing fence of `after` and the opening fence of `before`."""
    return all(not line.strip() for line in lines[after.end:before.line - 1])


def examples(path: Path) -> tuple[list[Example], list[str]]:
    """The runnable examples of a file, and the convention's violations found in it.

    A ```console block holds `$ command` lines, each followed by its output; a command
    ending in a backslash continues on the next line. A ```python block directly followed
    (blank lines only) by an ```output block is a program and what it prints."""
    blocks = read_blocks(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Example] = []
    problems: list[str] = []
    for index, block in enumerate(blocks):
        where = f"{path.name}:{block.line}"
        if block.skipped:
            continue
        if block.lang == "console":
            commands = _console(block)
            if not commands:
                problems.append(f"{where}: a console block without a `$ ` command "
                                "(commands without shown output go in a ```bash block)")
            found.extend(Example(path, line, "console", code, expected) for line, code, expected in commands)
        elif block.lang == "output":
            previous = blocks[index - 1] if index > 0 else None
            if previous is None or previous.lang != "python" or not _gap_is_blank(lines, previous, block):
                problems.append(f"{where}: an output block must follow its python block directly")
        elif block.lang == "python":
            following = blocks[index + 1] if index + 1 < len(blocks) else None
            if following is not None and following.lang == "output" and _gap_is_blank(lines, block, following):
                if not following.skipped:
                    found.append(Example(path, block.line, "python", block.text, following.text))
    return found, problems


def _console(block: Block) -> list[tuple[int, str, str]]:
    """(line, command, expected output) for each `$ ` command of a console block."""
    out: list[tuple[int, str, str]] = []
    lines = block.text.split("\n")
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            i += 1  # text before the first command: not compared
            continue
        line = block.line + 1 + i
        command = lines[i][2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        i += 1
        expected: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        out.append((line, command, "\n".join(expected)))
    return out


# -- comparing ----------------------------------------------------------------------------

_NUMBER = r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w)"
_TOKEN = re.compile(rf"(?P<number>{_NUMBER})|(?P<ellipsis>\.\.\.)|(?P<space>[ \t]+)|(?P<other>.)")
_ANY_LINES = "..."


def _normalise(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.strip("\n").split("\n")]
    return [] if lines == [""] else lines


def _pattern(expected: list[str]) -> tuple[re.Pattern[str], list[tuple[int, str]]]:
    """A regex for the output and the numbers it captures, as (line of the expected, text)."""
    parts: list[str] = []
    numbers: list[tuple[int, str]] = []
    for row, line in enumerate(expected):
        if line.strip() == _ANY_LINES:
            parts.append(r"(?:[^\n]*\n)*?")
            continue
        for token in _TOKEN.finditer(line):
            kind, text = token.lastgroup, token.group()
            if kind == "number":
                parts.append(r"(-?\d+(?:\.\d+)?)")
                numbers.append((row, text))
            elif kind == "ellipsis":
                parts.append(r"[^\n]*?")
            elif kind == "space":
                parts.append(r"[ \t]+" if token.start() else r"[ \t]*")
            else:
                parts.append(re.escape(text))
        parts.append(r"\n")
    return re.compile("".join(parts)), numbers


def tolerance(number: str) -> Decimal:
    """How far a shown number may be from the real one: an integer exactly, a decimal by one
    unit of its last shown digit (30.6 stands for anything printed as 30.5 to 30.7), which
    absorbs a rounding that falls the other way on another CPU."""
    if "." not in number:
        return Decimal(0)
    return Decimal(1).scaleb(-len(number.split(".")[1]))


def compare(expected_text: str, actual_text: str) -> list[str]:
    """What differs between the output a doc shows and the real output; [] when they agree.

    Line by line after trailing spaces are dropped; a run of spaces matches any run of
    spaces; `...` matches any text within a line, a line of only `...` any number of
    lines; numbers are compared by value within `tolerance`."""
    expected, actual = _normalise(expected_text), _normalise(actual_text)
    pattern, numbers = _pattern(expected)
    match = pattern.fullmatch("".join(line + "\n" for line in actual))
    if match is None:
        diff = difflib.unified_diff(expected, actual, "shown in the docs", "real output", lineterm="", n=2)
        return ["the text differs:", *diff]
    problems = []
    for (row, shown), got in zip(numbers, match.groups(), strict=True):
        if abs(Decimal(shown) - Decimal(got)) > tolerance(shown):
            problems.append(f"output line {row + 1}: shows {shown}, the real run prints {got}: {expected[row].strip()}")
    return problems


# -- running ------------------------------------------------------------------------------

DEFAULT_TARGET = "localhost:50051"
DEFAULT_METRICS = "localhost:8002"
DEFAULT_HTTP = "localhost:8000"


def run(example: Example, *, target: str, metrics: str, cwd: Path, env: dict[str, str],
        python: str, timeout: float = 60, http: str = DEFAULT_HTTP) -> str:
    """Run an example against the server at `target` (metrics at `metrics`) and return what it
    printed, stdout and stderr interleaved as a terminal shows them. The docs' default addresses
    (localhost:50051, localhost:8002, localhost:8000 for HTTP) are replaced by the real ones."""
    code = example.code.replace(DEFAULT_TARGET, target).replace(DEFAULT_METRICS, metrics).replace(DEFAULT_HTTP, http)
    argv = ["bash", "-o", "pipefail", "-c", code] if example.kind == "console" else [python, "-c", code]
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, check=False)
    return done.stdout
