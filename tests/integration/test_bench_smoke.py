"""`make bench` keeps working: a very short run end to end (no timing thresholds:
those live in the benchmark's own report)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_benchmark_runs_and_reports_every_ratio(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--duration", "0.5", "--baseline-seconds", "0.2", "--concurrency", "1",
         "8", "--no-hf", "--no-sweep", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "latest.json").read_text())
    assert {f"{w}_c{c}" for w in ("short", "heavy", "mixed") for c in (1, 8)} == set(out["service"])
    for run in out["service"].values():
        assert run["requests"] > 0 and run["p50_ms"] <= run["p99_ms"]
    names = {r["ratio"] for r in out["ratios"]}
    assert any(n.startswith("heavy, 8 clients") for n in names) and any("RSS" in n for n in names)
    assert "| ratio | measured | target | met |" in done.stdout
