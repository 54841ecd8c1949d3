"""The SDK fails one way: an AttentionError subclass per status, with the code, the
details, the server's request id and whether a retry may help; raised from the RpcError."""

import pickle

import grpc
import pytest

import attention_client as ac
from attention_client import AsyncAttentionClient, AttentionClient, AttentionError
from attention_client.errors import error_for
from tests.unit.fake_service import FakeService

CLASSES = {
    grpc.StatusCode.CANCELLED: ac.CallCancelledError,
    grpc.StatusCode.UNKNOWN: ac.UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: ac.InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: ac.DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: ac.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ac.AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: ac.PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ac.ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: ac.FailedPreconditionError,
    grpc.StatusCode.ABORTED: ac.AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: ac.OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: ac.UnimplementedError,
    grpc.StatusCode.INTERNAL: ac.InternalError,
    grpc.StatusCode.UNAVAILABLE: ac.UnavailableError,
    grpc.StatusCode.DATA_LOSS: ac.DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: ac.UnauthenticatedError,
}


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details, trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_every_failure_status_has_its_class():
    assert set(CLASSES) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    for code, cls in CLASSES.items():
        exc = error_for(code, "why", request_id="r-1")
        assert type(exc) is cls and isinstance(exc, AttentionError)
        assert (exc.code, exc.details, exc.request_id) == (code, "why", "r-1")
        assert str(exc) == f"{code.name}: why (request id r-1)"
        assert getattr(ac, cls.__name__) is cls and cls.__name__ in ac.__all__


def test_from_rpc_error_reads_status_details_and_request_id():
    rpc = FakeRpcError(grpc.StatusCode.NOT_FOUND, "model 'x' is not served",
                       (("other", "1"), ("x-request-id", "abc123")))
    exc = AttentionError.from_rpc_error(rpc)
    assert isinstance(exc, ac.NotFoundError)
    assert (exc.code, exc.details, exc.request_id) == (grpc.StatusCode.NOT_FOUND, "model 'x' is not served", "abc123")
    bytes_id = AttentionError.from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, "x", (("x-request-id", b"b1"),)))
    assert bytes_id.request_id == "b1"


def test_an_rpc_error_that_cannot_tell_is_unknown():
    exc = AttentionError.from_rpc_error(grpc.RpcError("bare"))
    assert isinstance(exc, ac.UnknownError) and exc.request_id is None and exc.details == "bare"


@pytest.mark.parametrize(("code", "details", "retryable"), [
    (grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another instance", True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full: 60000 tokens waiting + 9000 requested exceed "
                                         "max_queue_tokens=65536; retry with backoff", True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "512 MiB of results are waiting to be read by their callers", True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "response would be about 3.0 MiB, over the 2 MiB limit "
                                         "(max_response_bytes); use AnalyzeStream", False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (20000000 vs. 16777216)", False),
    (grpc.StatusCode.INVALID_ARGUMENT, "options.top_k: must be ...", False),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", False),
    (grpc.StatusCode.INTERNAL, "internal error (incident 1234)", False),
    (grpc.StatusCode.UNAUTHENTICATED, "no token", False),
])
def test_retryable(code, details, retryable):
    assert error_for(code, details).retryable is retryable


def test_errors_survive_pickling():
    exc = error_for(grpc.StatusCode.UNAVAILABLE, "down", request_id="r9")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is ac.UnavailableError
    assert (back.code, back.details, back.request_id, back.retryable) == (exc.code, "down", "r9", True)


def test_raised_from_the_rpc_error_with_the_servers_request_id():
    with FakeService() as fake, AttentionClient(fake.target, timeout=10) as client:
        with pytest.raises(ac.UnavailableError) as err:
            client.analyze("!UNAVAILABLE")
        assert isinstance(err.value.__cause__, grpc.RpcError)
        assert err.value.details == "fake failure" and err.value.request_id.startswith("fake-")
        assert err.value.retryable
        with pytest.raises(ac.PermissionDeniedError) as err:
            client.analyze_batch(["fine", "!PERMISSION_DENIED"])
        assert err.value.request_id.startswith("fake-")
        with pytest.raises(ac.NotFoundError) as err:
            client.get_model("nope")
        assert err.value.request_id == "fake-model" and "nope" in err.value.details


def test_a_stream_fails_at_the_failing_sequence():
    with FakeService() as fake, AttentionClient(fake.target, timeout=10) as client:
        seen = []
        with pytest.raises(ac.ResourceExhaustedError) as err:
            for result in client.analyze_stream(["one", "two", "!RESOURCE_EXHAUSTED", "four"]):
                seen.append(result.index)
        assert seen == [0, 1] and err.value.request_id.startswith("fake-")
        assert isinstance(err.value.__cause__, grpc.RpcError)


async def test_async_client_raises_the_same_classes():
    with FakeService() as fake:
        async with AsyncAttentionClient(fake.target, timeout=10) as client:
            with pytest.raises(ac.InternalError) as err:
                await client.analyze("!INTERNAL")
            assert err.value.request_id.startswith("fake-") and isinstance(err.value.__cause__, grpc.RpcError)
            with pytest.raises(ac.UnauthenticatedError):
                await client.analyze_batch(["!UNAUTHENTICATED"])
            with pytest.raises(ac.DeadlineExceededError):
                [r async for r in client.analyze_stream(["ok", "!DEADLINE_EXCEEDED"])]
            with pytest.raises(ac.NotFoundError):
                await client.get_model("nope")


def test_bad_arguments_never_reach_the_server():
    with FakeService() as fake, AttentionClient(fake.target, timeout=10) as client:
        for call in (lambda: client.analyze("x", top_k=0), lambda: client.analyze("x", layers=[]),
                     lambda: client.analyze_batch([]), lambda: client.analyze_stream(["x"], rollout="median"),
                     lambda: client.analyze("x", timeout=-1), lambda: client.list_models(timeout=0)):
            with pytest.raises(ac.InvalidArgumentError):
                call()
        assert fake.requests == []


def test_no_server_is_unavailable_and_retryable():
    with AttentionClient("127.0.0.1:1", timeout=10) as client, pytest.raises(ac.UnavailableError) as err:
        client.list_models()
    assert err.value.retryable and err.value.request_id is None


def test_a_corrupt_response_is_internal():
    """A tensor whose bytes do not match its shape: the SDK's decoding fails as INTERNAL."""
    with FakeService() as fake, AttentionClient(fake.target, timeout=10) as client:
        fake.corrupt = True
        with pytest.raises(ac.InternalError, match="response: could not decode"):
            client.analyze("x")
        with pytest.raises(ac.InternalError, match="response: could not decode"):
            list(client.analyze_stream(["x"]))
