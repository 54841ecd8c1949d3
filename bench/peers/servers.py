"""The peer servers as processes: started from their venvs on ports the system
chooses, found by the sockets the process listens on (neither server prints the
port it was given), ready once the Open Inference Protocol over gRPC says the
model is, and stopped with SIGTERM. Runs in the benchmark's own process."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.ort_rss import rss_kib
from bench.server import process_cpu_seconds, stop_process
from bench.workloads import MODEL_DIR, ROOT

MODEL = "minilm-l6"
MLSERVER_CONFIGS = ROOT / "bench" / "peers" / "mlserver"
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def venv(name: str) -> Path:
    """The peer's venv (`make bench-peers`), or SystemExit saying how to make it."""
    path = ROOT / f".venv-bench-{name}"
    if not (path / ".installed").exists():
        raise SystemExit(f"peers: {path.name} is missing; `make bench-peers` builds it")
    return path


def listening_ports(table: str, inodes: set[int]) -> list[int]:
    """Ports in LISTEN state, in a /proc/net/tcp or tcp6 table, of the sockets with these inodes."""
    ports = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[3] == LISTEN and int(fields[9]) in inodes:
            ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(set(ports))


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def process_ports(pid: int) -> list[int]:
    inodes = socket_inodes(pid)
    tables = (Path(f"/proc/{pid}/net/{name}") for name in ("tcp", "tcp6"))
    return sorted({p for t in tables if t.exists() for p in listening_ports(t.read_text(), inodes)})


def descendants(pid: int) -> list[int]:
    """The process's children, theirs, and so on."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def model_ready(port: int, timeout: float = 2.0) -> bool:
    """Whether an Open Inference Protocol gRPC server on this port has the model ready."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        return bool(client.is_model_ready(MODEL, client_timeout=timeout))
    except InferenceServerException:  # not gRPC (the HTTP port), or not ready yet
        return False
    finally:
        client.close()


class PeerServer:
    """One peer in its own process; `target` is its gRPC host:port once started."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.argv = argv
        self.env = os.environ | (env or {})
        self.cwd = cwd
        self.target = ""

    def start(self) -> None:
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     env=self.env)

    def wait(self, timeout: float = 120.0) -> None:
        """Until one of the process's listening ports answers that the model is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            for port in process_ports(self.proc.pid):
                if model_ready(port):
                    self.target = f"127.0.0.1:{port}"
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: no model ready in {timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def cpu_seconds(self) -> float:
        """CPU of the server and of its child processes (MLServer's inference worker)."""
        total = 0.0
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                total += process_cpu_seconds(pid)
            except OSError:  # ended meanwhile
                continue
        return total

    def rss(self) -> dict[str, int]:
        return rss_kib(str(self.proc.pid))

    def __enter__(self) -> PeerServer:
        self.start()
        try:
            self.wait()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)
        self.log.close()


def kserve() -> PeerServer:
    python = venv("kserve") / "bin" / "python"
    return PeerServer("KServe", [str(python), "-m", "bench.peers.kserve_runtime", "--model_name", MODEL,
                                 "--model_path", str(MODEL_DIR / "model.onnx"), "--grpc_port", "0",
                                 "--http_port", "0"])


def mlserver(config: str, workdir: Path) -> PeerServer:
    """`mlserver start` on bench/peers/mlserver/<config>; run in `workdir`, where MLServer
    keeps its .metrics and .envs folders; the runtime imported from this repository."""
    command = venv("mlserver") / "bin" / "mlserver"
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return PeerServer(f"MLServer ({config})", [str(command), "start", str(MLSERVER_CONFIGS / config)],
                      env={"PYTHONPATH": pythonpath}, cwd=workdir)
