"""Replicas for real: three `attention-server` processes on loopback, the SDK balancing
over them by itself (an `ipv4:` target), one replica killed or drained mid-run without
a failed call, behind an L4 proxy (a TCP round-robin forwarder, as a Kubernetes Service
is) that a short max connection age re-spreads, and behind Debian's nginx as the gRPC
L7 balancer with the config the compose profile ships. Who served what is read from each
replica's Open Inference Protocol ModelStatistics (successful calls of its model)."""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml

from attention_client import AttentionClient, AttentionError
from attention_server._proto.inference import grpc_service_pb2 as kpb
from attention_server._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from tests.helpers import MODEL_DIR, ROOT, ServerProcess, wait_until

pytestmark = pytest.mark.slow

MODEL = MODEL_DIR.name
CALLERS = 8
AGE = 2.0  # the replicas' --max-connection-age: every connection gets GOAWAY after 1.8-2.2 s
# One single-threaded runtime per replica (nothing here depends on the number of cores); short-lived
# connections all along, so every test below also runs through connections being replaced.
REPLICA_ARGS = ("--instances", "1", "--intra-op-threads", "1", "--http-port", "-1", "--grace-period", "30",
                "--max-connection-age", str(AGE), "--max-connection-age-grace", "10")


def served(target: str) -> int:
    """Calls of the model this replica completed (ModelStatistics' success count)."""
    with grpc.insecure_channel(target) as channel:
        reply = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            kpb.ModelStatisticsRequest(name=MODEL), timeout=10)
    return reply.model_stats[0].inference_stats.success.count


def shares(before: list[int], after: list[int]) -> list[float]:
    done = [b - a for a, b in zip(before, after, strict=True)]
    return [d / sum(done) for d in done]


class Replicas:
    """Three replica processes; `target` is the SDK's `ipv4:` target over all of them."""

    def __init__(self, count: int = 3) -> None:
        self.procs = [ServerProcess(*REPLICA_ARGS) for _ in range(count)]

    def __enter__(self) -> Replicas:
        with ThreadPoolExecutor(len(self.procs)) as pool:  # the model loads in each, side by side
            list(pool.map(ServerProcess.__enter__, self.procs))
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.__exit__()

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(p.target for p in self.procs)

    def served(self) -> list[int]:
        return [served(p.target) for p in self.procs]

    def restart(self, index: int) -> ServerProcess:
        """Start replica `index` again on the port it had (after it exited)."""
        old = self.procs[index]
        assert old.proc is not None and old.proc.poll() is not None, "the replica is still running"
        self.procs[index] = ServerProcess(*REPLICA_ARGS, "--port", str(old.port)).__enter__()
        return self.procs[index]

    def heal(self) -> None:
        """Every replica running again (after a test that stopped one failed half-way)."""
        for index, proc in enumerate(self.procs):
            if proc.proc is not None and proc.proc.poll() is not None:
                self.restart(index)


@pytest.fixture(scope="module")
def replicas() -> Iterator[Replicas]:
    with Replicas() as group:
        yield group


@pytest.fixture
def group(replicas: Replicas) -> Iterator[Replicas]:
    replicas.heal()
    yield replicas


class Load:
    """CALLERS threads calling analyze with a short text in a loop, each on its own client
    or all on one, until stopped; counts the calls that succeeded and keeps every failure."""

    def __init__(self, clients: list[AttentionClient]) -> None:
        self.clients = clients
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(CALLERS)]

    def _run(self, caller: int) -> None:
        client = self.clients[caller % len(self.clients)]
        for n in itertools.count():
            if self._stop.is_set():
                return
            try:
                client.analyze(f"caller {caller} asks {n}: the cat sat on the mat", top_k=1,
                               attention=False, hidden_states=False)
            except AttentionError as exc:
                with self._lock:
                    self.failures.append(str(exc))
            else:
                with self._lock:
                    self.ok += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def wait_for(self, more: int, timeout: float = 60) -> None:
        """Until `more` calls beyond those done so far have succeeded."""
        goal = self.ok + more
        wait_until(lambda: self.ok >= goal or self.failures, timeout)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


# -- the SDK balances by itself -------------------------------------------------------------------

def test_one_client_spreads_its_calls_over_every_replica(group: Replicas):
    before = group.served()
    with AttentionClient(group.target, timeout=30) as client, Load([client]) as load:
        load.wait_for(240)
    split = shares(before, group.served())
    print(f"\nper-replica shares of {sum(group.served()) - sum(before)} calls: {[f'{s:.0%}' for s in split]}")
    assert load.failures == []
    assert all(0.20 <= s <= 0.47 for s in split), split


def test_sigkill_of_a_replica_mid_run_fails_no_call_and_its_restart_gets_calls_again(group: Replicas):
    victim, survivors = group.procs[0], group.procs[1:]
    with AttentionClient(group.target, timeout=30) as client, Load([client]) as load:
        load.wait_for(60)
        before = [served(p.target) for p in survivors]
        done_before = load.ok
        victim.proc.send_signal(signal.SIGKILL)
        assert victim.proc.wait(10) == -signal.SIGKILL
        load.wait_for(150)
        after = [served(p.target) for p in survivors]
        # Every call done since the kill was served by a survivor (up to CALLERS were on their way back).
        assert sum(after) - sum(before) >= load.ok - done_before - CALLERS
        back = group.restart(0)
        listening = time.monotonic()
        wait_until(lambda: served(back.target) > 0, timeout=10)
        print(f"\nSIGKILL: {load.ok} calls, {len(load.failures)} failed; survivors served "
              f"{[a - b for a, b in zip(after, before, strict=True)]} since; the restarted replica served a call "
              f"{time.monotonic() - listening:.1f} s after listening")
    assert load.failures == []


def test_sigterm_of_a_replica_mid_run_fails_no_call_and_it_exits_0(group: Replicas):
    victim = group.procs[1]
    with AttentionClient(group.target, timeout=30) as client, Load([client]) as load:
        load.wait_for(60)
        signalled = time.monotonic()
        victim.proc.send_signal(signal.SIGTERM)
        assert victim.proc.wait(30) == 0
        exited = time.monotonic() - signalled
        load.wait_for(150)
    drain = victim.stderr()
    print(f"\nSIGTERM: {load.ok} calls, {len(load.failures)} failed; drained in {log_span(drain):.3f} s "
          f"({drain.count('server is shutting down')} call(s) refused while draining), exited after {exited:.2f} s")
    assert load.failures == []
    assert "shutting down" in drain and "stopped" in drain and "Traceback" not in drain
    group.restart(1)


def log_span(log: str) -> float:
    """Seconds from the server's "shutting down" log line to its "stopped" line."""
    def when(message: str) -> float:
        stamp = re.search(rf"^\S+ (\d+):(\d+):(\d+),(\d+) .*: {message}", log, re.M)
        assert stamp, message
        h, m, sec, ms = map(int, stamp.groups())
        return h * 3600 + m * 60 + sec + ms / 1000
    return when("stopped") - when("shutting down")


# -- behind an L4 balancer -------------------------------------------------------------------------

class RoundRobinProxy:
    """A TCP forwarder on 127.0.0.1 that hands each new connection to the next backend in
    turn and then only copies bytes, as a Kubernetes Service (kube-proxy) does: it never
    sees a call, so a client's HTTP/2 connection stays on the replica it landed on."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self.connections: list[Connection] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.target = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._forward, "127.0.0.1", 0)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(len(self.connections) % len(self.backends))
        self.connections.append(connection)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.backends[connection.backend])
        except OSError:
            writer.close()
            connection.closed = True
            return

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await source.read(1 << 16):
                    connection.replies += len(data) if count else 0
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(copy(reader, up_writer, False), copy(up_reader, writer, True))
        connection.closed = True

    def clients_per_backend(self, since: float) -> list[int]:
        """Connections opened since `since`, still open, that carried calls, per backend (the
        gRPC client opens and drops a connection without a call now and then: not counted)."""
        counts = [0] * len(self.backends)
        for c in list(self.connections):
            if c.opened >= since and not c.closed and c.replies > 1024:
                counts[c.backend] += 1
        return counts

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            forwarding = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in forwarding:
                task.cancel()
            await asyncio.gather(*forwarding, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class Connection:
    def __init__(self, backend: int) -> None:
        self.backend = backend
        self.opened = time.monotonic()
        self.replies = 0  # bytes from the replica
        self.closed = False


def test_behind_an_l4_proxy_a_max_connection_age_spreads_long_lived_clients(group: Replicas):
    backends = [("127.0.0.1", p.port) for p in group.procs]
    proxy = RoundRobinProxy(backends[:1])  # one replica behind the Service at first
    # Eight clients as eight processes would be: a connection each (gRPC shares one between
    # channels of a process to the same address unless told not to).
    clients = [AttentionClient(proxy.target, timeout=30, options=[("grpc.use_local_subchannel_pool", 1)])
               for _ in range(CALLERS)]
    try:
        with Load(clients) as load:
            load.wait_for(40)
            assert proxy.clients_per_backend(0) == [CALLERS]
            proxy.backends = backends  # scaled up: two more replicas behind the same address
            scaled = time.monotonic()
            # Each client's connection ages out (GOAWAY) and it reconnects through the proxy, which
            # hands the new connections round the three replicas.
            wait_until(lambda: min(proxy.clients_per_backend(scaled)) >= 1, timeout=2 * AGE)
            spread = time.monotonic() - scaled
            clients_on = proxy.clients_per_backend(scaled)
            before = group.served()
            load.wait_for(120)
            split = shares(before, group.served())
        print(f"\nL4 proxy: {CALLERS} clients on {clients_on} connections per replica {spread:.1f} s after the "
              f"scale-up (max connection age {AGE} s); shares since {[f'{s:.0%}' for s in split]}")
        assert load.failures == []
        assert all(s >= 0.05 for s in split), split
    finally:
        for client in clients:
            client.close()
        proxy.close()


# -- behind an L7 balancer: nginx ------------------------------------------------------------------

NGINX_CONF = ROOT / "deploy" / "nginx" / "attention-grpc.conf"


def nginx_binary() -> str:
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    assert path, "nginx is missing: `make test` installs Debian's nginx (`make nginx`)"
    return path


def nginx_config(shipped: str, replicas: list[str], listen: str) -> str:
    """The shipped config with the test's replica addresses and listening socket."""
    servers = re.findall(r"^\s*server attention[\w-]*:50051([^;]*);$", shipped, re.M)
    assert len(servers) == 3, "the shipped upstream lists three replicas"
    lines = "\n".join(f"    server {address}{servers[0]};" for address in replicas)
    upstream = re.sub(r"(^\s*server attention[\w-]*:50051[^;]*;\n)+", lines + "\n", shipped, count=1, flags=re.M)
    config, listens = re.subn(r"listen 50051 http2;", f"listen {listen} http2;", upstream)
    assert listens == 1
    return config


@pytest.fixture
def nginx(group: Replicas, tmp_path: Path) -> Iterator[str]:
    """Debian's nginx in the foreground over the three replicas, every path it writes in
    tmp_path (so it needs no root); yields the SDK target of its listening socket."""
    socket_path = tmp_path / "grpc.sock"
    (tmp_path / "attention-grpc.conf").write_text(
        nginx_config(NGINX_CONF.read_text(), [p.target for p in group.procs], f"unix:{socket_path}"))
    (tmp_path / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {tmp_path}/access.log;
    client_body_temp_path {tmp_path}/client_body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    include {tmp_path}/attention-grpc.conf;
}}
""")
    proc = subprocess.Popen([nginx_binary(), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                             "-e", str(tmp_path / "error.log")], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: socket_path.exists() or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, f"nginx did not start: {proc.stderr.read() if proc.stderr else ''}" \
                                    f"{(tmp_path / 'error.log').read_text()}"
        yield f"unix:{socket_path}"
    finally:
        proc.terminate()
        proc.wait(30)


def test_behind_nginx_one_connection_is_spread_call_by_call(group: Replicas, nginx: str):
    before = group.served()
    with AttentionClient(nginx, timeout=30) as client:
        assert client.get_model().name == MODEL
        with Load([client]) as load:
            load.wait_for(240)
    split = shares(before, group.served())
    print(f"\nnginx: shares of {sum(group.served()) - sum(before)} calls on one client connection: "
          f"{[f'{s:.0%}' for s in split]}")
    assert load.failures == []
    assert all(0.20 <= s <= 0.47 for s in split), split



def test_behind_nginx_a_replica_drained_by_sigterm_fails_no_call(group: Replicas, nginx: str):
    # The draining replica's listener closes at once: nginx's next connection to it is refused and the
    # call goes to another replica; its idle connections to it get GOAWAY and are dropped.
    with AttentionClient(nginx, timeout=30) as client, Load([client]) as load:
        load.wait_for(60)
        victim = group.procs[2]
        victim.proc.send_signal(signal.SIGTERM)
        assert victim.proc.wait(30) == 0
        load.wait_for(150)
    print(f"\nnginx, SIGTERM of a replica: {load.ok} calls, {len(load.failures)} failed")
    assert load.failures == []


def test_the_compose_profile_runs_this_config_over_its_replicas():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    nginx = services["nginx"]
    assert nginx["profiles"] == ["scale"]
    assert f"./{NGINX_CONF.relative_to(ROOT)}:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    image = services["attention"]["image"]
    replicas = sorted(name for name, service in services.items() if service.get("image") == image)
    upstream = sorted(re.findall(r"^\s*server ([\w-]+):50051\b", NGINX_CONF.read_text(), re.M))
    assert upstream == replicas and len(replicas) == 3
    assert set(nginx["depends_on"]) == set(replicas)
    assert all("ports" not in services[name] for name in replicas if name != "attention")
