"""Throughput against concurrency and latency percentiles, as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REFERENCE = {"short": ("short_b1", "ORT batch-1 loop"), "heavy": ("heavy_b8", "ORT batch 8"),
             "mixed": ("mixed_b1", "ORT batch-1 loop")}


def plot(out: dict[str, Any], path: Path) -> None:
    workloads = ["short", "heavy", "mixed"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for col, wl in enumerate(workloads):
        runs = sorted((r for r in out["service"].values() if r["workload"] == wl), key=lambda r: r["concurrency"])
        if not runs:
            continue
        conc = [r["concurrency"] for r in runs]
        ax = axes[0][col]
        ax.plot(conc, [r["tokens_per_s"] for r in runs], "o-", label="service (client SDK)")
        key, label = REFERENCE[wl]
        if key in out["ort"]:
            ax.axhline(out["ort"][key]["tokens_per_s"], color="gray", ls="--", label=f"in-process {label}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{wl}: throughput")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        for p in ("p50", "p90", "p99"):
            ax.plot(conc, [r[f"{p}_ms"] for r in runs], "o-", label=p)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{wl}: latency")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    fig.suptitle(f"attention service vs in-process ONNX Runtime — {out['machine']}", fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)
