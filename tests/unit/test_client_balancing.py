"""The SDK's default service config: round_robin over every address of the target, and
gRPC's retries of the idempotent calls on UNAVAILABLE (and a server's CANCELLED), never on
bad input, a full queue or a deadline. Read from the options the clients build, then
checked against in-process fake services (no model)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from attention_client import AsyncAttentionClient, AttentionClient, AttentionError, cli
from attention_client._channel import RETRIED_METHODS, SERVICE, channel_options, is_loopback, service_config
from attention_client._proto.attention.v1 import attention_pb2 as pb
from tests.unit.fake_service import FakeService


def config_of(options: list[tuple[str, Any]]) -> dict[str, Any]:
    [config] = [json.loads(value) for key, value in options if key == "grpc.service_config"]
    return config


# -- the config ---------------------------------------------------------------------------------

def test_calls_are_balanced_round_robin_and_every_method_is_retried():
    config = config_of(channel_options(None))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method_config] = config["methodConfig"]
    names = {(name["service"], name["method"]) for name in method_config["name"]}
    # Every method of the service is named: a new RPC fails this until someone decides whether it is idempotent.
    service = pb.DESCRIPTOR.services_by_name["AttentionService"]
    assert names == {(SERVICE, m.name) for m in service.methods} == {(SERVICE, m) for m in RETRIED_METHODS}


def test_retries_cover_unavailable_and_never_bad_input_a_full_queue_or_a_deadline():
    policy = config_of(channel_options(None))["methodConfig"][0]["retryPolicy"]
    assert set(policy["retryableStatusCodes"]) == {"UNAVAILABLE", "CANCELLED"}
    assert 2 <= policy["maxAttempts"] <= 5  # gRPC caps attempts at 5
    assert policy["initialBackoff"].endswith("s") and policy["maxBackoff"].endswith("s")
    assert policy["backoffMultiplier"] > 1


def test_a_callers_option_replaces_the_sdks_for_its_key():
    mine = json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})
    options = channel_options([("grpc.max_receive_message_length", 1 << 20), ("grpc.service_config", mine)])
    keys = [key for key, _ in options]
    assert len(keys) == len(set(keys)), "each key once: gRPC would take the first of a repeated key"
    assert dict(options)["grpc.max_receive_message_length"] == 1 << 20
    assert dict(options)["grpc.service_config"] == mine
    assert dict(options)["grpc.max_send_message_length"] == 64 << 20  # the SDK's others stay


def test_a_callers_lb_policy_keeps_the_retries_but_not_round_robin():
    # A service config's balancing outranks grpc.lb_policy_name, so the SDK leaves its own out.
    options = channel_options([("grpc.lb_policy_name", "pick_first")])
    config = config_of(options)
    assert "loadBalancingConfig" not in config and config["methodConfig"]
    assert config == service_config(round_robin=False)


@pytest.mark.parametrize(("target", "local"), [
    ("ipv4:127.0.0.1:1,127.0.0.2:2", True), ("ipv6:[::1]:1,[::1]:2", True),
    ("ipv4:127.0.0.1:1,10.0.0.2:2", False), ("dns://8.8.8.8/localhost:1", True),
    ("dns:///attention-headless.ns.svc:50051", False),
])
def test_an_address_list_is_loopback_when_every_address_is(target, local):
    assert is_loopback(target) is local


# -- against fake services ------------------------------------------------------------------------

@pytest.fixture
def fakes() -> Iterator[list[FakeService]]:
    with FakeService() as one, FakeService() as two, FakeService() as three:
        yield [one, two, three]


def ipv4(services: list[FakeService]) -> str:
    return "ipv4:" + ",".join(s.target for s in services)


# One connection per address, each taking the next call in turn once it is up (calls made
# before any is up go to the first one ready), so 30 calls in a row land about 10 on each.

def test_calls_spread_over_every_address_of_the_target(fakes):
    with AttentionClient(ipv4(fakes), timeout=10) as client:
        for k in range(30):
            client.analyze(f"call {k}", attention=False, hidden_states=False)
    assert all(len(f.requests) >= 7 for f in fakes), [len(f.requests) for f in fakes]


def test_the_async_client_spreads_its_calls_too(fakes):
    async def run() -> None:
        async with AsyncAttentionClient(ipv4(fakes), timeout=10) as client:
            for k in range(30):
                await client.analyze(f"call {k}", attention=False)

    asyncio.run(run())
    assert all(len(f.requests) >= 7 for f in fakes), [len(f.requests) for f in fakes]


@pytest.mark.parametrize(("code", "attempts"), [
    ("UNAVAILABLE", 5), ("CANCELLED", 5),
    ("INVALID_ARGUMENT", 1), ("RESOURCE_EXHAUSTED", 1), ("DEADLINE_EXCEEDED", 1), ("INTERNAL", 1),
])
def test_which_statuses_are_sent_again(code, attempts):
    with FakeService() as fake, AttentionClient(fake.target, timeout=30) as client:
        with pytest.raises(AttentionError) as failed:
            client.analyze(f"!{code}")
        assert failed.value.code == getattr(grpc.StatusCode, code)
        assert len(fake.requests) == attempts


def test_a_stream_is_sent_again_only_before_its_first_result():
    with FakeService() as fake, AttentionClient(fake.target, timeout=30) as client:
        with pytest.raises(AttentionError):
            list(client.analyze_stream(["!UNAVAILABLE", "two"]))
        assert len(fake.requests) == 5
        fake.requests.clear()
        stream = client.analyze_stream(["one", "!UNAVAILABLE"])
        assert next(stream).index == 0
        with pytest.raises(AttentionError) as failed:
            next(stream)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE and len(fake.requests) == 1


def test_a_call_past_its_deadline_is_not_sent_again():
    calls: list[int] = []
    release = threading.Event()

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls.append(1)
        release.wait(10)
        return pb.ListModelsResponse().SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "ListModels": grpc.unary_unary_rpc_method_handler(slow)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with AttentionClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(AttentionError) as late:
                client.list_models(timeout=0.3)
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and calls == [1]
    finally:
        release.set()
        server.stop(0).wait(10)


def test_wait_for_ready_waits_for_a_server_instead_of_failing_at_once():
    with FakeService() as gone:
        target = gone.target
    # Nothing listens there now: without wait_for_ready the call fails fast with UNAVAILABLE
    # (after its retries); with it, the call waits for a server until its deadline.
    with AttentionClient(target, timeout=10) as client:
        with pytest.raises(AttentionError) as fast:
            client.list_models()
    with AttentionClient(target, timeout=0.5, wait_for_ready=True) as client:
        with pytest.raises(AttentionError) as waited:
            client.list_models()
    assert (fast.value.code, waited.value.code) == (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_the_cli_takes_any_target_and_spreads_its_requests(fakes, capsys):
    texts = [f"text number {k}" for k in range(9)]
    assert cli.main(["--target", ipv4(fakes), "--timeout", "10", "analyze", *texts, "--batch-size", "1"]) == 0
    assert sum(len(f.requests) for f in fakes) == 9 and all(f.requests for f in fakes), \
        [len(f.requests) for f in fakes]


def test_the_cli_waits_for_a_server_when_asked(capsys):
    with FakeService() as gone:
        target = gone.target
    assert cli.main(["--target", target, "--timeout", "0.5", "--wait-for-ready", "models"]) == 1
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err
