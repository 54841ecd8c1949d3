"""The real `attention-server` in its own process, on free ports, for the benchmark."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

from bench.ort_rss import rss_kib
from bench.workloads import ROOT

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (all its threads; 10 ms steps)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class Server:
    """`attention-server` on port 0 (gRPC), and on another free port for HTTP when
    `http` is set. `env` is added to this process's environment, from which every
    OTEL_* variable is taken out first: tracing is on only when `env` asks for it."""

    def __init__(self, *args: str, http: bool = False, env: Mapping[str, str] | None = None,
                 cpus: set[int] | None = None) -> None:
        self.args = args
        self.http = http
        self.cpus = cpus  # the server runs on these CPUs only (sched_setaffinity), when set
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | dict(env or {})
        self.http_url = ""

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "attention_server", "--host", "127.0.0.1", "--port", "0", "--log-level",
             "WARNING", "--metrics-port", "-1", "--http-port", "0" if self.http else "-1", *self.args],
            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=self.env,
            preexec_fn=None if self.cpus is None else lambda: os.sched_setaffinity(0, self.cpus or set()))
        assert self.proc.stdout is not None
        try:
            self.target = self._address(self.proc.stdout.readline(), "listening on")
            if self.http:  # host:port, as tritonclient.http takes it
                self.http_url = self._address(self.proc.stdout.readline(), "HTTP on http://")
        except BaseException:
            self.__exit__()
            raise
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # never let stdout fill up
        return self

    @staticmethod
    def _address(line: str, after: str) -> str:
        match = re.search(re.escape(after) + r" ?\S*?:(\d+)$", line.strip())
        if not match:
            raise RuntimeError(f"server did not start: {line!r}")
        return f"127.0.0.1:{match.group(1)}"

    def rss(self) -> dict[str, int]:
        return rss_kib(str(self.proc.pid))

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, 30 s to exit, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
