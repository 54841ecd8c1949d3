from pathlib import Path

import pytest
from pydantic import ValidationError

from attention_server.settings import Settings


def test_defaults():
    s = Settings(_cli_parse_args=[])
    assert s.port == 50051 and s.default_model == "minilm-l6"
    assert s.model_repository == Path("models/repository")


def test_environment_then_flags(monkeypatch):
    monkeypatch.setenv("ATTENTION_PORT", "6000")
    monkeypatch.setenv("ATTENTION_MAX_BATCH_SIZE", "8")
    s = Settings(_cli_parse_args=["--port", "7000", "--models", '["a","b"]'])
    assert s.port == 7000  # flag wins
    assert s.max_batch_size == 8  # environment
    assert s.models == ["a", "b"]


def test_invalid_values_are_refused():
    with pytest.raises(ValidationError):
        Settings(_cli_parse_args=["--port", "70000"])
    with pytest.raises(ValidationError):
        Settings(max_batch_size=0)
