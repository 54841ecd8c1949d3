"""Hostile input against a real server process: hypothesis profiles and the
server fixture (one `python -m attention_server` per test module).

Profiles (HYPOTHESIS_PROFILE): `ci`, the default, is derandomized and bounded so
the whole suite runs in about a minute on two cores; `long` (`make fuzz`) draws
ten times as many examples with a random seed each run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.fuzz.harness import PROFILE, FuzzServer
from tests.helpers import MODEL_DIR

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                 HealthCheck.large_base_example]

# Repeatable in CI; no deadline (a slow example is the server's reply bound to judge, not hypothesis').
settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=False,
                          suppress_health_check=_SLOW_IS_FINE,
                          phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink])
settings.register_profile("long", derandomize=False, deadline=None, database=None, print_blob=True,
                          suppress_health_check=_SLOW_IS_FINE)
settings.load_profile(PROFILE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.fuzz)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Stop before the first test, with the fix, when fuzz tests are selected and the model is missing."""
    here = Path(__file__).parent
    if any(here in Path(item.path).parents for item in session.items) and not (MODEL_DIR / "model.json").is_file():
        raise pytest.UsageError(f"{MODEL_DIR} is missing: run `make model` (or `make test`, which does it)")


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[FuzzServer]:
    """A fresh server process per module, so RSS and stderr are the module's own."""
    with FuzzServer() as server:
        yield server
