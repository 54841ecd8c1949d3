"""A fresh process with only an ONNX Runtime session that runs the heavy batches
the service ran; prints its resident memory (the RSS reference)."""

from __future__ import annotations

import json
import sys

from bench.baselines import OrtBaseline, tokenize
from bench.workloads import HEAVY


def rss_kib(pid: str = "self") -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0])
    return fields


def main() -> None:
    sizes = [int(x) for x in sys.argv[1:]] or [1, 8, 32]
    ort = OrtBaseline()
    ids = tokenize(HEAVY.texts(max(sizes)))
    for size in sizes:
        ort.run([ids[:size]], HEAVY.outputs, seconds=0.5)
    print(json.dumps(rss_kib()))


if __name__ == "__main__":
    main()
