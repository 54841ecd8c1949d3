"""bench/targets.py: one table of every performance target from latest.json."""

from bench import targets


def _out() -> dict:
    return {
        "peers": {"targets": [{"ratio": "heavy: service / KServe", "median": 1.6, "min": 1.2, "max": 2.1,
                               "per_round": [1.2, 1.6, 2.1], "target": ">= 2", "met": False}]},
        "latency": {"targets": [{"ratio": "1 x 510 full", "value": 1.5, "min": 1.4, "max": 1.7, "target": "<= 1.6",
                                 "met": True}]},
        "shm": {"targets": {"shm client CPU ms per sequence": {"measured": 1.02, "target": "< 0.3", "met": False}}},
        "service": {"short_c1": {}},
        "ratios": [{"ratio": "server RSS / ORT RSS", "value": 0.5, "target": "<= 1.5", "met": True}],
    }


def test_every_section_gives_its_rows_and_missed_targets_stay():
    rows = targets.rows(_out())
    assert [(r["section"], r["met"]) for r in rows] == [("peers", False), ("latency", True), ("shm", False),
                                                        ("service", True)]
    assert rows[0]["value"] == 1.6 and (rows[0]["min"], rows[0]["max"]) == (1.2, 2.1)
    assert rows[2]["value"] == 1.02 and rows[2]["min"] is None
    text = "\n".join(targets.markdown(_out()))
    assert "## Targets: 2 of 4 met" in text
    assert "| peers | heavy: service / KServe | 1.60 (1.20-2.10) | >= 2 | NO |" in text
    assert "| shm | shm client CPU ms per sequence | 1.02 | < 0.3 | NO |" in text


def test_sections_that_did_not_run_have_no_rows():
    out = _out()
    del out["peers"], out["service"]  # the service ratios are dropped with their section
    assert {r["section"] for r in targets.rows(out)} == {"latency", "shm"}
    assert targets.markdown({}) == []
