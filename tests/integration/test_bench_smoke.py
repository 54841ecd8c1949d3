"""`make bench` keeps working: very short runs end to end (no timing thresholds:
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
         "8", "--no-hf", "--only", "service", "--out", str(tmp_path)],
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


@pytest.mark.slow
def test_benchmark_compares_http_with_grpc_and_tracing_on_with_off(tmp_path):
    """One round of each comparison; a section it does not run is kept from the
    folder's latest.json, with its date."""
    earlier = {"machine": "m", "date": "2000-01-01 00:00", "sweep": {"length": {}, "batch": {}}}
    (tmp_path / "latest.json").write_text(json.dumps(earlier))
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--only", "http,tracing", "--rounds", "1", "--round-seconds", "0.5",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "latest.json").read_text())
    assert out["dates"]["sweep"] == "2000-01-01 00:00" and out["sweep"] == earlier["sweep"]
    assert out["dates"]["http"] == out["dates"]["tracing"] == out["date"]
    http, tracing = out["http"], out["tracing"]
    assert set(http["runs"]) == {"heavy_grpc_c8", "heavy_http_c8", "heavy_grpc_c4_shared", "heavy_http_c4_shared",
                                 "small_grpc_c1", "small_http_c1", "small_http_json_c1"}
    assert set(tracing["runs"]) == {f"{w}_{t}" for w in ("short_c1", "heavy_c8") for t in ("off", "on", "off2")}
    for section in (http, tracing):
        for runs in section["runs"].values():
            assert len(runs) == 1 and runs[0]["requests"] > 0 and runs[0]["p50_ms"] <= runs[0]["p99_ms"]
            assert runs[0].get("server_cpu_ms_per_call", 0) >= 0  # 10 ms steps: a short run may see none
        assert all(r["median"] is None or r["median"] >= 0 for r in section["ratios"].values())
    heavy_http = http["runs"]["heavy_http_c8"][0]
    assert heavy_http["tokens_per_s"] == pytest.approx(128 * heavy_http["rps"])  # 1 x 128 tokens a call
    assert http["ratios"]["heavy, 8 callers: HTTP binary seq/s / gRPC seq/s"]["median"] > 0
    assert tracing["ratios"]["short, 1 client: p50 on / off"]["median"] > 0
    assert tracing["exported"]["spans_per_call"] >= 1  # the traced server did trace, and its spans reached the sink
    assert "## Open Inference Protocol: HTTP/REST against gRPC" in done.stdout
    assert "## Tracing off and on" in done.stdout


@pytest.mark.slow
def test_benchmark_measures_capacity_per_core(tmp_path):
    """One short round of the capacity section: both pinned servers, all four workloads, the planning rows."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--only", "capacity", "--rounds", "1", "--round-seconds", "0.5",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cap = json.loads((tmp_path / "latest.json").read_text())["capacity"]
    assert set(cap["runs"]) == {f"{w}_{c}core" for w in ("short", "small", "pairs128", "heavy") for c in (1, 2)}
    for name, workload in cap["workloads"].items():
        assert workload["cpu_ms_per_call"]["1"] > 0 and workload["reply_bytes"] > 0, name
        assert [row["rate"] for row in workload["plan"]] == [100, 1_000, 10_000]
    assert cap["workloads"]["heavy"]["reply_bytes"] > 6 * 12 * 128 * 128 * 4  # full float32 attention
    assert cap["keda"]["threshold"] > 0
    assert "## Capacity per core" in done.stdout


@pytest.mark.slow
def test_benchmark_measures_the_latency_and_shared_memory_targets(tmp_path):
    """One short round of the latency and shm sections: every target row of both, in the one table."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--only", "latency,shm", "--quick", "--rounds", "1", "--round-seconds",
         "0.5", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "latest.json").read_text())
    lat, shm = out["latency"], out["shm"]
    assert set(lat["results"]) == {"short", "full512", "topk512", "topk512x"}  # --quick: no mixed load
    for case in lat["results"].values():
        assert len(case["ort"]) == len(case["after"]) == 1 and all(t > 0 for t in case["after"][0]["times"])
    assert len(lat["targets"]) == 5 and all(r["value"] > 0 for r in lat["targets"])
    assert shm["medians"]["shm"]["rps"] > 0 and len(shm["targets"]) == 2
    assert "## Targets: " in done.stdout and "| latency | 1 x 510, full float32 attention" in done.stdout
    assert "| shm | shm / in-process ORT batch 8 |" in done.stdout
