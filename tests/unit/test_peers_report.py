"""The peers section's arithmetic (bench/peers/report.py) and how it finds a peer's
port (bench/peers/servers.py): ratios within each round, targets judged on the
median and kept when missed, the table; LISTEN sockets read from /proc/net/tcp."""

from __future__ import annotations

import pytest

from bench.peers import report, servers


def _runs(**series: list[dict[str, float]]) -> dict[str, list[dict[str, float]]]:
    return dict(series)


def test_ratio_is_taken_within_each_round_then_summarized():
    runs = _runs(b=[{"rps": 10.0}, {"rps": 30.0}, {"rps": 8.0}], a=[{"rps": 5.0}, {"rps": 10.0}, {"rps": 0.0}])
    r = report.ratio(runs, "b", "rps", "a", "rps")
    assert r["per_round"] == [2.0, 3.0, None]  # round 3's A is 0: no ratio, not a division error
    assert (r["median"], r["min"], r["max"]) == (2.5, 2.0, 3.0)


def test_ratio_may_compare_two_keys():
    runs = _runs(b=[{"p99_ms": 9.0}], a=[{"p50_ms": 3.0}])
    assert report.ratio(runs, "b", "p99_ms", "a", "p50_ms")["median"] == 3.0


def _round(service: dict[str, float], kserve: dict[str, float], ort1: dict[str, float], ort8: dict[str, float]):
    return {"small_c1_service": [service], "small_c1_kserve": [kserve], "small_ort_b1": [ort1],
            "heavy_c8_service": [service], "heavy_c8_kserve": [kserve], "heavy_ort_b8": [ort8],
            "small_c32_service": [service], "small_c32_kserve": [kserve]}


def test_every_target_is_reported_and_a_missed_one_stays():
    runs = _round(service={"p50_ms": 4.0, "p99_ms": 10.0, "rps": 30.0},
                  kserve={"p50_ms": 4.0, "p99_ms": 6.0, "rps": 10.0},
                  ort1={"p50_ms": 4.0, "p99_ms": 5.0, "rps": 250.0}, ort8={"rps": 40.0})
    rows = {r["ratio"]: r for r in report.targets(runs)}
    assert len(rows) == len(report.TARGETS) == 6
    p50_kserve = rows["single call, 1 x 16, full attention: service p50 / KServe p50"]
    assert (p50_kserve["median"], p50_kserve["target"], p50_kserve["met"]) == (1.0, "<= 0.8", False)
    assert rows["single call, 1 x 16: service p50 / in-process ORT p50"]["met"]  # 1.0 <= 1.3
    assert not rows["single call, 1 x 16: service p99 / in-process ORT p50"]["met"]  # 2.5 > 2
    assert rows["heavy, 8 clients x 1 x 128: service seq/s / KServe seq/s"]["met"]  # 3.0 >= 2
    assert not rows["heavy, 8 clients x 1 x 128: service seq/s / in-process ORT batch 8"]["met"]  # 0.75 < 0.85


def test_a_target_whose_side_was_not_measured_is_left_out():
    runs = {"small_c1_service": [{"p50_ms": 1.0}], "small_c1_kserve": [{"p50_ms": 2.0}]}
    assert [r["ratio"] for r in report.targets(runs)] == [report.TARGETS[0].label]


def test_markdown_has_the_peer_table_and_the_targets():
    runs = _round(service={"p50_ms": 4.0, "p99_ms": 10.0, "rps": 30.0, "server_cpu_ms_per_call": 2.0},
                  kserve={"p50_ms": 4.0, "p99_ms": 6.0, "rps": 10.0, "server_cpu_ms_per_call": 3.0},
                  ort1={"p50_ms": 4.0, "p99_ms": 5.0, "rps": 250.0}, ort8={"rps": 40.0})
    peers = {"rounds": 1, "seconds_per_run": 2.0, "adaptive": "max_batch_size 8", "versions": {"kserve": "0.21.0"},
             "loadavg": ["1 1 1", "2 2 2", "3 3 3"], "summary": report.summary(runs), "targets": report.targets(runs)}
    text = "\n".join(report.markdown(peers, "2026-11-29 21:00"))
    assert "| workload | in-process ORT | this service | KServe 0.21.0 | MLServer |" in text
    assert "| heavy: 8 clients x 1x128, full fp32 attention, seq/s | 40.0 (40.0-40.0) (batch 8) | 30.0 (30.0-30.0) " \
           "| 10.0 (10.0-10.0) | - | - |" in text
    assert "| short: 32 clients x 1x16, req/s | 250 (250-250) (batch-1 loop) | 30 (30-30) | 10 (10-10) |" in text
    assert "| ratio | measured | target | met |" in text
    assert "| single call, 1 x 16, full attention: service p50 / KServe p50 | 1.00 (1.00-1.00) | <= 0.8 | NO |" in text
    assert "at the start: 1 1 1; at each round: 2 2 2; at the end: 3 3 3" in text


TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A3F1 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1 0
   2: 0100007F:A3F1 0100007F:C000 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0
"""


@pytest.mark.parametrize(("inodes", "ports"), [({4242}, [0xA3F1]), ({4242, 999}, [8080, 0xA3F1]),
                                               ({4243}, []), (set(), [])])
def test_listening_ports_are_the_process_own_listen_sockets(inodes, ports):
    assert servers.listening_ports(TCP, inodes) == ports
