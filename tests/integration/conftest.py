"""Integration tests run real servers on the exported model: they need
`models/repository/minilm-l6` (`make model`; `make test` exports it first).
Unit tests need no model and do not load this file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from attention_client import AttentionClient
from tests.helpers import MODEL_DIR, ServerThread

HERE = Path(__file__).parent


def pytest_collection_finish(session: pytest.Session) -> None:
    """Stop before the first test, with the fix, when integration tests are selected and the model is missing."""
    selected = any(HERE in Path(item.path).parents for item in session.items)
    if selected and not (MODEL_DIR / "model.json").is_file():
        raise pytest.UsageError(f"{MODEL_DIR} is missing: run `make model` (or `make test`, which does it)")


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread]:
    """One real server on a free port, shared by the session."""
    with ServerThread() as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server: ServerThread) -> Iterator[AttentionClient]:
    with AttentionClient(server.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding the five tiny models of tests/tiny_models.py (tiny-bert,
    tiny-roberta, tiny-distilbert, tiny-gpt2, tiny-llama), exported once per session by the
    real exporter; their source folders are in ../tiny-sources/<arch>."""
    from tests.tiny_models import ARCHITECTURES, export_tiny

    repository = tmp_path_factory.mktemp("tiny") / "repository"
    for arch in ARCHITECTURES:
        export_tiny(arch, repository)
    return repository
