from __future__ import annotations

from collections.abc import Iterator

import pytest

from attention_client import AttentionClient
from tests.helpers import MODEL_DIR, ServerThread


def pytest_sessionstart(session: pytest.Session) -> None:
    if not (MODEL_DIR / "model.json").is_file():
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
