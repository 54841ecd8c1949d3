"""grpc.health.v1 tells the truth: every service name follows whether the default
model is loaded and whether the server is draining, and probes keep getting an
answer (NOT_SERVING) while a SIGTERM drain is under way."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attention_client import AttentionClient, AttentionError
from attention_server._proto.inference import grpc_service_pb2 as kpb
from attention_server._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from tests.helpers import MODEL_DIR, ServerProcess, ServerThread, wait_until

NAMES = ("", "attention.v1.AttentionService", "inference.GRPCInferenceService")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DEFAULT = MODEL_DIR.name


def probe(target: str) -> dict[str, int]:
    """One health check per service name, each on a new connection, as a container probe makes it."""
    statuses = {}
    for name in NAMES:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        statuses[name] = reply.status
    return statuses


def all_are(status: int) -> Callable[[dict[str, int]], bool]:
    return lambda statuses: set(statuses.values()) == {status}


def test_health_follows_the_default_model_through_unload_and_load():
    with ServerThread(model_control_mode="explicit") as srv, grpc.insecure_channel(srv.target) as channel, \
            AttentionClient(srv.target, timeout=60) as client:
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert all_are(SERVING)(probe(srv.target))

        kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=DEFAULT), timeout=60)
        wait_until(lambda: all_are(NOT_SERVING)(probe(srv.target)), timeout=10)
        with pytest.raises(AttentionError) as unloaded:
            client.analyze("no model to run this on")
        assert unloaded.value.code == grpc.StatusCode.NOT_FOUND
        assert not kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready

        kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=DEFAULT), timeout=120)
        wait_until(lambda: all_are(SERVING)(probe(srv.target)), timeout=10)
        assert client.analyze("back again", top_k=1).tokens
        assert kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready


def test_health_watchers_see_the_default_model_go_and_come_back():
    with ServerThread(model_control_mode="explicit") as srv, grpc.insecure_channel(srv.target) as channel:
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
        try:
            assert next(watch).status == SERVING
            kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=DEFAULT), timeout=60)
            assert next(watch).status == NOT_SERVING
            kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=DEFAULT), timeout=120)
            assert next(watch).status == SERVING
        finally:
            watch.cancel()


@pytest.mark.slow
def test_sigterm_health_answers_not_serving_while_a_call_drains():
    # Results of 4 x 302 tokens with attention are ~26 MB each: the server cannot finish
    # sending before this client reads, so the call stays in flight until it does.
    # On SIGTERM the server turns NOT_SERVING and sends GOAWAY at once (the listener
    # closes: clients move to other replicas; docs/operations.md), while calls in flight finish.
    texts = ["word " * 300] * 4
    with ServerProcess("--grace-period", "60") as proc, AttentionClient(proc.target, timeout=120) as client:
        assert all_are(SERVING)(probe(proc.target))
        stream = client.analyze_stream(texts)
        first = next(stream)
        proc.proc.send_signal(signal.SIGTERM)

        def not_ready() -> bool:  # a probe on a new connection: NOT_SERVING, or refused once the port closed
            try:
                return all_are(NOT_SERVING)(probe(proc.target))
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAVAILABLE

        wait_until(not_ready, timeout=30)
        assert proc.proc.poll() is None, "the server exited with a call still in flight"
        command = subprocess.run([sys.executable, "-m", "attention_server.healthcheck", "--target", proc.target],
                                 capture_output=True, text=True, timeout=60)
        assert command.returncode != 0, command.stdout
        with pytest.raises(AttentionError) as refused:
            client.analyze("new work while draining", timeout=10)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE

        rest = list(stream)
        assert [r.index for r in [first, *rest]] == [0, 1, 2, 3]
        assert proc.proc.wait(60) == 0
        err = proc.stderr()
        assert "draining: 1 call(s) in flight" in err and "stopped" in err
        assert "Traceback" not in err


def test_drain_gives_up_on_a_call_still_running_after_the_grace_period(caplog):
    # A caller that stops reading keeps its call in flight; the drain must not wait past the grace period.
    with ServerThread() as srv, AttentionClient(srv.target, timeout=120) as client:
        stream = client.analyze_stream(["word " * 300] * 4)
        next(stream)
        started = time.monotonic()
        asyncio.run_coroutine_threadsafe(srv.server.stop(1.0), srv.loop).result(30)
        assert time.monotonic() - started < 10
        with pytest.raises(AttentionError) as cut:
            list(stream)
        assert cut.value.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert "grace period of 1.0 s over with 1 call(s) still in flight" in caplog.text
