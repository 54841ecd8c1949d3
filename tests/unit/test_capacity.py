"""Capacity on paper (bench/capacity.py, docs/scaling.md): the arithmetic, and that the
docs and the KEDA threshold carry the figures of the last recorded run."""

import json

import pytest
import yaml

from bench import capacity
from tests.helpers import ROOT

RESULTS = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
SCALING = (ROOT / "docs" / "scaling.md").read_text()


def _runs(cpu_ms: dict[str, float], rounds: int = 3) -> dict[str, list[dict[str, float]]]:
    return {f"{name}_{c}core": [{"server_cpu_ms_per_call": ms * c_factor, "rps": 1000 / ms, "p50_ms": 10.0}
                                for _ in range(rounds)]
            for name, ms in cpu_ms.items() for c, c_factor in ((1, 1.0), (2, 1.1))}


def test_a_plan_needs_rate_times_cpu_over_the_target_utilisation():
    row = capacity.plan(1000, 5.0, 10_000)
    assert row["cores"] == pytest.approx(1000 * 0.005 / 0.7)  # 7.14 cores at 70%
    assert row["replicas"] == 2  # of 4 cores
    assert row["mbit_per_s"] == pytest.approx(80.0)
    assert capacity.plan(1, 0.1, 10)["replicas"] == 1  # never zero


def test_the_keda_threshold_is_half_a_second_of_the_slowest_workload_on_a_replica():
    cpu = {"short": 5.0, "small": 5.0, "pairs128": 50.0, "heavy": 40.0}
    cap = capacity.summarize({"runs": _runs(cpu), "reply_bytes": dict.fromkeys(cpu, 1000),
                              "rss_kib": {"1core": {"VmRSS": 1, "VmHWM": 500 * 1024},
                                          "2core": {"VmRSS": 1, "VmHWM": 600 * 1024}}})
    # Planned on the 2-core server's CPU (1.1x): 128 tokens / 55 ms = 2,327 tokens/s a core, the least.
    assert cap["keda"]["from"] == "pairs128"
    assert cap["keda"]["threshold"] == round(4 * 128 / 0.055 * 0.5, -2)
    assert cap["workloads"]["heavy"]["two_cores_cpu_ratio"] == pytest.approx(1.1)
    assert cap["memory"]["estimate_mib_4core"] == pytest.approx(500 + 3 * 100)


def test_docs_scaling_carries_the_last_capacity_run():
    cap = RESULTS["capacity"]
    for line in capacity.per_core_table(cap) + capacity.planning_table(cap):
        assert line in SCALING, f"docs/scaling.md lacks, from bench/results/latest.json: {line}"
    assert RESULTS["dates"]["capacity"] in SCALING


def test_the_keda_threshold_is_the_measured_one():
    scaled = yaml.safe_load((ROOT / "deploy/kubernetes/components/keda/scaledobject.yaml").read_text())
    queued = next(t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus")
    threshold = RESULTS["capacity"]["keda"]["threshold"]
    assert int(queued["metadata"]["threshold"]) == threshold
    assert f"{threshold:,}" in SCALING and f"{threshold:,}" in (ROOT / "docs/kubernetes.md").read_text()
