"""`make soak` for 60 seconds: a real server process under the mixed workload from
four client processes; no unexpected error, no descriptor or thread growth, nothing
left booked in the server.

Memory is judged by the 5-minute `make soak` (docs/soak.md), not here: one minute of
this load is too short for the resting RSS to settle (runs here ended -6% to +21%
from their warm-up value, while 5-minute runs ended within +1%), and the peak goal
(idle + result budget) is not met yet (1.3-1.45 GB: the runtime's working set and
the response copies are outside the budget; see docs/soak.md)."""

import json
import subprocess
import sys

import pytest

from bench.soak import KINDS
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    done = subprocess.run([sys.executable, "-m", "bench.soak", "--duration", "60", "--json", str(out)],
                          capture_output=True, text=True, timeout=540, cwd=ROOT)
    assert out.is_file(), done.stderr[-3000:]
    return json.loads(out.read_text()), done


def _goal(summary: dict, name: str) -> dict:
    return next(g for g in summary["goals"] if g["goal"].startswith(name))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_kind_of_call_ran_and_only_expected_errors(soak):
    summary, done = soak
    assert set(summary["outcomes_by_kind"]) == {k.name for k in KINDS}
    assert summary["calls"] > summary["priming_calls"] > 0
    assert summary["unexpected_errors"] == {}, done.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_descriptors_and_threads_back_to_their_start(soak):
    """Threads may end above their start only within the pools the server starts lazily (see bench/soak.py)."""
    summary, done = soak
    assert _goal(summary, "open descriptors")["met"], done.stdout
    assert _goal(summary, "threads")["met"], done.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_server_books_nothing_in_flight_once_the_load_is_over(soak):
    summary, done = soak
    assert _goal(summary, "server's books")["met"], done.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_command_exits_0_when_every_goal_is_met(soak):
    summary, done = soak
    assert (done.returncode == 0) == summary["all_met"], done.stderr[-3000:]
