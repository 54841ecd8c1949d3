"""The README and docs/*.md cannot drift: every example that shows output is run
against one real server (the session's) and its output compared.

The convention (docs/architecture.md, "Examples in the docs are tests"):

- a ```console block: each `$ command` line is run by bash in a scratch directory
  (with `.venv` linked in, the venv's bin first on PATH, ATTENTION_TARGET set to the
  test server); the lines after it, up to the next `$`, are its output, stdout and
  stderr as a terminal shows them. A console block must hold at least one `$` line.
- a ```python block directly followed by an ```output block: the program is run by
  the venv's Python in a fresh process and must print that output.
- `localhost:50051` / `localhost:8002` / `localhost:8000` in commands and code are
  replaced by the test server's gRPC / metrics / HTTP address.
- Numbers are compared by value: integers exactly, decimals within one unit of their
  last shown digit (a rounding that falls the other way on another CPU). `...` matches
  any text within a line, a line of only `...` any number of lines. Runs of spaces
  match any run of spaces; trailing spaces are ignored.
- `<!-- docs-test: skip (reason) -->` on the line before a fence exempts the block.
  ```bash blocks are commands without shown output: not run. Other ```python blocks
  must compile.

Not executed: timing figures (docs/performance.md and bench/results/latest.md are
measurements of one machine at one time; tests/integration/test_bench_smoke.py only
checks that the benchmark runs). The docs' flags, `make` targets and relative links
are checked against the real commands, the Makefile and the files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.docs_examples import Example, compare, examples, read_blocks, run
from tests.helpers import ROOT, ServerThread

README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12 * 1024
"""Bytes: README.md says what the service is and links the rest (docs/)."""

VENV_BIN = Path(sys.executable).parent
EXTERNAL_FLAGS = {"--build", "--dry-run", "--from-file", "--prune"}
"""Flags the docs show for other tools (docker compose, kubectl)."""


def _collect() -> tuple[list[Example], list[str]]:
    found: list[Example] = []
    problems: list[str] = []
    for path in DOCS:
        runnable, wrong = examples(path)
        found.extend(runnable)
        problems.extend(wrong)
    return found, problems


EXAMPLES, CONVENTION_PROBLEMS = _collect()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where examples run: files they write land here; `.venv/bin/...` works as in the repository."""
    path = tmp_path_factory.mktemp("docs")
    (path / ".venv").symlink_to(VENV_BIN.parent, target_is_directory=True)
    return path


@pytest.fixture(scope="module")
def addresses(server: ServerThread) -> tuple[str, str, str]:
    assert server.server is not None and server.server.metrics_port, "the test server serves metrics"
    assert server.server.http_port, "the test server serves HTTP"
    return server.target, f"127.0.0.1:{server.server.metrics_port}", f"127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def env(addresses: tuple[str, str, str]) -> dict[str, str]:
    # The developer's own ATTENTION_* (a token, another target) must not leak into the examples.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ATTENTION_")}
    return {**clean, "ATTENTION_TARGET": addresses[0], "PATH": f"{VENV_BIN}{os.pathsep}{clean.get('PATH', '')}",
            "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="module")
def outputs(scratch: Path, env: dict[str, str], addresses: tuple[str, str, str]) -> Iterator[dict[Example, str]]:
    """What each example prints, run once (two at a time: the examples are independent)."""
    target, metrics, http = addresses

    def one(example: Example) -> str:
        return run(example, target=target, metrics=metrics, cwd=scratch, env=env, python=sys.executable, http=http)

    with ThreadPoolExecutor(2) as pool:
        yield dict(zip(EXAMPLES, pool.map(one, EXAMPLES), strict=True))


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id(ROOT) for e in EXAMPLES])
def test_example_prints_what_the_docs_show(example: Example, outputs: dict[Example, str]) -> None:
    actual = outputs[example]
    problems = compare(example.expected, actual)
    assert not problems, (f"{example.id(ROOT)}: the real output differs from the docs\n$ {example.code}\n"
                          + "\n".join(problems) + "\n--- real output ---\n" + actual)


def test_the_docs_have_examples_of_both_kinds() -> None:
    """The collection itself works: a parser that finds nothing would pass everything."""
    kinds = {(e.path, e.kind) for e in EXAMPLES}
    assert (README, "console") in kinds and (README, "python") in kinds
    assert len(EXAMPLES) >= 10


def test_blocks_follow_the_convention() -> None:
    assert not CONVENTION_PROBLEMS, "\n".join(CONVENTION_PROBLEMS)


def test_a_changed_number_in_a_copy_fails(tmp_path: Path, outputs: dict[Example, str]) -> None:
    """Drift is caught: the README's CLI example with one percentage changed (in a copy) no
    longer matches the real output, nor does a changed word; the original does."""
    original = next(e for e in EXAMPLES if e.path == README and e.kind == "console")
    text = README.read_text(encoding="utf-8")
    shown = re.search(r"\d+\.\d%", original.expected)
    assert shown, "the README's first command shows a percentage"
    changed = f"{float(shown.group()[:-1]) + 2.0:.1f}%"
    for old, new in [(shown.group(), changed), ("role", "rôle")]:
        copy = tmp_path / "README.md"
        copy.write_text(text.replace(original.expected, original.expected.replace(old, new, 1), 1), encoding="utf-8")
        drifted = next(e for e in examples(copy)[0] if e.line == original.line)
        assert drifted.expected != original.expected
        assert compare(drifted.expected, outputs[original]), f"changing {old} to {new} went unnoticed"
    assert not compare(original.expected, outputs[original])


def test_other_python_blocks_compile() -> None:
    """Python blocks without shown output are not run, but they must be valid Python."""
    shown = {(e.path, e.line) for e in EXAMPLES if e.kind == "python"}
    for path in DOCS:
        for block in read_blocks(path):
            if block.lang == "python" and not block.skipped and (path, block.line) not in shown:
                compile(block.text, f"{path.name}:{block.line}", "exec")


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"{README.name} is {size} bytes; move detail to docs/ (limit {README_LIMIT})"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_resolve() -> None:
    broken = []
    for path in DOCS:
        for target in _LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def _help(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr[-2000:]}"
    return done.stdout


def test_flags_in_the_docs_exist() -> None:
    """Every --flag the docs mention is one of the project's commands' (renamed flags fail here)."""
    client = str(VENV_BIN / "attention-client")
    commands = [[str(VENV_BIN / "attention-server"), "--help"], [client, "--help"], [client, "analyze", "--help"],
                [client, "explore", "--help"], [client, "heads", "--help"],
                [str(VENV_BIN / "attention-healthcheck"), "--help"], [str(VENV_BIN / "attention-export"), "--help"],
                [sys.executable, "-m", "bench.run", "--help"], [sys.executable, "-m", "bench.soak", "--help"],
                [sys.executable, "-m", "bench.latency", "--help"], [sys.executable, "-m", "bench.graph", "--help"],
                [sys.executable, "-m", "bench.shm", "--help"]]
    flag = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
    with ThreadPoolExecutor(4) as pool:
        known = {f for text in pool.map(_help, commands) for f in flag.findall(text)} | EXTERNAL_FLAGS
    unknown = [f"{path.relative_to(ROOT)}: {f}" for path in DOCS
               for f in sorted(set(flag.findall(path.read_text(encoding="utf-8"))) - known)]
    assert not unknown, "flags no command has:\n" + "\n".join(unknown)


def test_make_targets_in_the_docs_exist() -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    unknown = [f"{path.relative_to(ROOT)}: make {t}" for path in DOCS
               for t in sorted(set(re.findall(r"`make ([a-z][\w-]*)", path.read_text(encoding="utf-8"))) - targets)]
    assert not unknown, "make targets the Makefile does not have:\n" + "\n".join(unknown)
