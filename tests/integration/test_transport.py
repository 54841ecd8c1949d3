"""Transport limits, set on purpose and tested with real connections: HTTP/2
streams per connection, metadata size, keepalive enforcement, idle connections."""

from __future__ import annotations

import threading

import grpc
import pytest

from attention_client import AttentionClient
from attention_client._proto.attention.v1 import attention_pb2 as pb
from tests.helpers import ServerThread

ANALYZE = "/attention.v1.AttentionService/Analyze"
ANALYZE_STREAM = "/attention.v1.AttentionService/AnalyzeStream"
SMALL = pb.AnalyzeRequest(sequences=[pb.Sequence(text="hi")], options=pb.AnalyzeOptions(attention=False))
# An AnalyzeStream that a caller does not read stays open (the server computes ahead only a little).
LONG_STREAM = pb.AnalyzeRequest(sequences=[pb.Sequence(text="word " * 300)] * 64)


@pytest.fixture(scope="module")
def limited():
    with ServerThread(max_concurrent_streams=2, max_metadata_kib=8, min_client_ping_interval=5,
                      max_ping_strikes=1, max_connection_idle=1.0) as srv:
        yield srv


def _open_streams(channel: grpc.Channel, count: int) -> list[grpc.Call]:
    calls = []
    for _ in range(count):
        call = channel.unary_stream(ANALYZE_STREAM)(LONG_STREAM.SerializeToString(), timeout=120)
        next(iter(call))  # the stream is open on the server
        calls.append(call)
    return calls


def test_calls_beyond_max_concurrent_streams_wait_on_the_client(limited):
    with grpc.insecure_channel(limited.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        streams = _open_streams(channel, 2)
        # A third call on the same connection is not sent while both streams are open...
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(ANALYZE)(SMALL.SerializeToString(), timeout=1.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # ...while another connection is served at once, and the same one as soon as a stream ends.
        with AttentionClient(limited.target, timeout=30) as other:
            assert len(other.analyze("other connection", attention=False).tokens) == 4
        streams[0].cancel()
        assert channel.unary_unary(ANALYZE)(SMALL.SerializeToString(), timeout=30)
        streams[1].cancel()


def test_oversized_metadata_is_refused(limited):
    with grpc.insecure_channel(limited.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(ANALYZE)(SMALL.SerializeToString(), metadata=[("x-padding", "a" * 16384)],
                                         timeout=30)
        assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                                    grpc.StatusCode.UNAVAILABLE), err.value
        # Within the limit is fine, on the same connection.
        assert channel.unary_unary(ANALYZE)(SMALL.SerializeToString(), metadata=[("x-padding", "a" * 1024)],
                                            timeout=30)


def _left_ready(channel: grpc.Channel, timeout: float) -> list[grpc.ChannelConnectivity]:
    """Connect, then wait until the connection is closed (the channel leaves READY)."""
    states: list[grpc.ChannelConnectivity] = []
    left = threading.Event()

    def watch(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if grpc.ChannelConnectivity.READY in states and state != grpc.ChannelConnectivity.READY:
            left.set()

    channel.unary_unary(ANALYZE)(SMALL.SerializeToString(), timeout=30)
    channel.subscribe(watch)
    try:
        assert left.wait(timeout), states
    finally:
        channel.unsubscribe(watch)
    return states


def test_a_client_that_pings_too_often_gets_goaway():
    pinging = [("grpc.keepalive_time_ms", 100), ("grpc.keepalive_timeout_ms", 5000),
               ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
    with ServerThread(min_client_ping_interval=5, max_ping_strikes=1, max_connection_idle=0) as srv:
        with grpc.insecure_channel(srv.target, options=pinging) as channel:
            _left_ready(channel, timeout=30)  # GOAWAY (too_many_pings) after the second early ping
        # A well-behaved client is served.
        with AttentionClient(srv.target, timeout=30) as client:
            assert len(client.analyze("still serving", attention=False).tokens) == 4


def test_idle_connections_are_closed(limited):
    with grpc.insecure_channel(limited.target) as channel:
        _left_ready(channel, timeout=30)  # the server closed the connection after 1 s without calls
        assert channel.unary_unary(ANALYZE)(SMALL.SerializeToString(), timeout=30)  # and the client reconnects
