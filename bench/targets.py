"""Every target of the performance issues in one table: what each section of
`make bench` measured against its target, met or not. A pure function of
latest.json (tested in tests/unit/test_bench_targets.py); a section that did not
run has no rows, a missed target keeps its row with met False."""

from __future__ import annotations

from typing import Any

# Where each section's rows come from, in the order the table lists them.
SECTIONS = ("peers", "latency", "shm", "service")


def _row(section: str, ratio: str, value: float | None, low: float | None, high: float | None, target: str,
         met: bool) -> dict[str, Any]:
    return {"section": section, "ratio": ratio, "value": value, "min": low, "max": high, "target": target,
            "met": met}


def rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    table = []
    for r in out.get("peers", {}).get("targets", []):
        table.append(_row("peers", r["ratio"], r["median"], r["min"], r["max"], r["target"], r["met"]))
    for r in out.get("latency", {}).get("targets", []):
        table.append(_row("latency", r["ratio"], r["value"], r["min"], r["max"], r["target"], r["met"]))
    for name, t in out.get("shm", {}).get("targets", {}).items():
        table.append(_row("shm", name, t["measured"], None, None, t["target"], t["met"]))
    if out.get("service"):
        for r in out.get("ratios", []):
            table.append(_row("service", r["ratio"], r["value"], None, None, r["target"], r["met"]))
    return table


def markdown(out: dict[str, Any]) -> list[str]:
    table = rows(out)
    if not table:
        return []
    met = sum(r["met"] for r in table)
    lines = ["", f"## Targets: {met} of {len(table)} met", "",
             "Medians over the section's rounds, (min-max) where the section has rounds; each section's date and "
             "load are in its own part below.", "",
             "| section | ratio | measured | target | met |", "|---|---|---:|---|---|"]
    for r in table:
        value = "-" if r["value"] is None else f"{r['value']:.2f}"
        if r["min"] is not None and r["max"] is not None:
            value += f" ({r['min']:.2f}-{r['max']:.2f})"
        lines.append(f"| {r['section']} | {r['ratio']} | {value} | {r['target']} | {'yes' if r['met'] else 'NO'} |")
    return lines
