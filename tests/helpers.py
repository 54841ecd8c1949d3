"""Real servers for tests: in-process on its own event-loop thread, or as a
subprocess of the real `attention-server` command. Both bind port 0."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from attention_server.grpc_api.server import AttentionServer, create_server
from attention_server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "models" / "repository"
MODEL_DIR = REPOSITORY / "minilm-l6"


class ServerThread:
    """A real grpc.aio server running on a background thread's event loop."""

    def __init__(self, **settings: object) -> None:
        settings = {"metrics_port": 0, "http_port": 0, "model_repository": REPOSITORY, **settings}
        self.settings = Settings(host="127.0.0.1", port=0, **settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.server: AttentionServer | None = None
        self.port = 0

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.server, self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        return self

    async def _start(self) -> tuple[AttentionServer, int]:
        server, port = create_server(self.settings)
        await server.start()
        return server, port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The HTTP port's base URL (no trailing slash)."""
        assert self.server is not None and self.server.http_port is not None, "the HTTP port is off"
        scheme = "https" if self.server.http_tls else "http"
        return f"{scheme}://127.0.0.1:{self.server.http_port}"

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class ServerProcess:
    """`python -m attention_server --port 0`; reads the bound port from its stdout."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = ["--host", "127.0.0.1", "--port", "0", "--model-repository", str(REPOSITORY),
                     "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--http-port", "0", *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "attention_server", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on .*:(\d+)$", line.strip())
        if not match:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.port = int(match.group(1))
        self.http_port: int | None = None
        # The last --http-port given wins; unless it is -1 the server prints a second line with the port.
        http_on = self.args[len(self.args) - 1 - self.args[::-1].index("--http-port") + 1] != "-1"
        if http_on:
            http = re.search(r"HTTP on \S+://.*:(\d+)$", self.proc.stdout.readline().strip())
            self.http_port = int(http.group(1)) if http else None
        # Drain stderr all along: a full pipe would block the server's logging.
        self._stderr: list[str] = []
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        return self

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def stderr(self) -> str:
        """What the server wrote to stderr so far (all of it once it has exited)."""
        if self.proc is not None and self.proc.poll() is not None:
            self._drain.join(10)
        return "".join(self._stderr)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> object:
    """Poll `predicate` until it returns something truthy and return that; AssertionError
    after `timeout` seconds (tests wait for a condition, never for a fixed time)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value {value!r})")
        time.sleep(interval)
    return value


def place_model_file(source: Path, target: Path) -> None:
    """Put a model file into a test repository: a hard link (cheap; a symbolic link to a file
    outside the model folder is refused by the server), a copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything a server sends on a raw socket until it closes it (the socket's timeout bounds the wait).

    A server that closes a socket with unread bytes in it (a client still trickling) makes the kernel send a
    reset instead of a FIN; what arrived before it is still returned. A server that never closes: TimeoutError.
    """
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received
