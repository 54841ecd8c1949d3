"""Bad input gets a clear status naming the field and the limit; the server keeps serving."""

import grpc
import pytest

from attention_client import (
    AttentionClient,
    AttentionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client._proto.attention.v1 import attention_pb2_grpc as pb_grpc
from tests.helpers import ServerThread

GOOD = "The server still answers."


def _raw(server, request):
    """Send a hand-built message (what another service would send)."""
    with grpc.insecure_channel(server.target) as channel:
        pb_grpc.AttentionServiceStub(channel).Analyze(request, timeout=30)


CASES = [
    # (description, kwargs for client.analyze_batch and a raw request, code, words the server's message holds)
    ("empty batch", {"sequences": []}, "INVALID_ARGUMENT", ["sequences", "empty batch", "64"]),
    ("empty text", {"sequences": [""]}, "INVALID_ARGUMENT", ["sequences[0].text", "empty"]),
    ("blank text", {"sequences": ["ok", "   \n"]}, "INVALID_ARGUMENT", ["sequences[1].text", "empty"]),
    ("empty ids", {"sequences": [[]]}, "INVALID_ARGUMENT", ["sequences[0].token_ids.ids", "empty"]),
    ("too long", {"sequences": ["word " * 600]}, "INVALID_ARGUMENT", ["sequences[0].text", "602 tokens", "512"]),
    ("ids too long", {"sequences": [[101] * 513]}, "INVALID_ARGUMENT", ["sequences[0].token_ids.ids", "513", "512"]),
    ("id over vocab", {"sequences": [[101, 30522, 102]]}, "INVALID_ARGUMENT",
     ["sequences[0].token_ids.ids[1]", "30522", "[0, 30522)"]),
    ("negative id", {"sequences": [[101, -1, 102]]}, "INVALID_ARGUMENT", ["sequences[0].token_ids.ids[1]", "-1"]),
    ("layer out of range", {"sequences": [GOOD], "layers": [0, 6]}, "INVALID_ARGUMENT",
     ["options.layers[1]", "6", "[0, 6)"]),
    ("negative layer", {"sequences": [GOOD], "layers": [-1]}, "INVALID_ARGUMENT", ["options.layers[0]", "-1"]),
    ("head out of range", {"sequences": [GOOD], "heads": [12]}, "INVALID_ARGUMENT", ["options.heads[0]", "[0, 12)"]),
    ("duplicate head", {"sequences": [GOOD], "heads": [3, 3]}, "INVALID_ARGUMENT", ["options.heads[1]", "twice"]),
    ("top_k zero", {"sequences": [GOOD], "top_k": 0}, "INVALID_ARGUMENT", ["options.top_k", "[1, 262144]", "0"]),
    ("top_k over all pairs", {"sequences": [GOOD], "top_k": 262145}, "INVALID_ARGUMENT",
     ["options.top_k", "[1, 262144]", "262145"]),
    ("text over the character limit", {"sequences": [" " * 16385]}, "INVALID_ARGUMENT",
     ["sequences[0].text", "16385 characters", "16384"]),
    ("ids far over the limit", {"sequences": [[101] * 100_000]}, "INVALID_ARGUMENT",
     ["sequences[0].token_ids.ids", "100000 token ids", "512"]),
    ("layers listed too often", {"sequences": [GOOD], "layers": [0] * 7}, "INVALID_ARGUMENT",
     ["options.layers", "7 layers", "6"]),
    ("top_k negative", {"sequences": [GOOD], "top_k": -3}, "INVALID_ARGUMENT", ["options.top_k", "-3"]),
    ("min_strength", {"sequences": [GOOD], "top_k": 1, "min_strength": 1.5}, "INVALID_ARGUMENT",
     ["options.min_strength", "[0, 1]"]),
    ("batch too big", {"sequences": ["x"] * 65}, "INVALID_ARGUMENT", ["sequences", "65", "64"]),
    ("unknown model", {"sequences": [GOOD], "model": "gpt-17"}, "NOT_FOUND", ["gpt-17", "minilm-l6"]),
]


def _raw_request(kwargs):
    """The case as a hand-built message: what any caller, not only this SDK, sends."""
    sequences = []
    for seq in kwargs["sequences"]:
        sequences.append(pb.Sequence(text=seq) if isinstance(seq, str) else pb.Sequence(token_ids=pb.TokenIds(ids=seq)))
    options = pb.AnalyzeOptions(layers=kwargs.get("layers", []), heads=kwargs.get("heads", []),
                                min_strength=kwargs.get("min_strength", 0.0))
    if "top_k" in kwargs:
        options.top_k = kwargs["top_k"]
    return pb.AnalyzeRequest(model=kwargs.get("model", ""), sequences=sequences, options=options)


@pytest.mark.parametrize(("kwargs", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_status_and_message_then_still_serving(server, client, kwargs, code, words):
    # the server's answer, whoever calls
    with pytest.raises(grpc.RpcError) as raw:
        _raw(server, _raw_request(kwargs))
    assert raw.value.code().name == code
    for word in words:
        assert word in raw.value.details(), raw.value.details()
    # through the SDK: the same status and field, refused before the call when the SDK can tell
    kwargs = dict(kwargs)
    sequences = kwargs.pop("sequences")
    with pytest.raises(AttentionError) as err:
        client.analyze_batch(sequences, **kwargs)
    assert err.value.code.name == code and not err.value.retryable
    assert type(err.value) is {"INVALID_ARGUMENT": InvalidArgumentError, "NOT_FOUND": NotFoundError}[code]
    assert words[0] in err.value.details, err.value.details
    if err.value.request_id is not None:  # reached the server: its details, word for word
        assert err.value.details == raw.value.details()
    assert len(client.analyze(GOOD, top_k=1).tokens) == 7


def test_the_sdk_refuses_what_it_can_check_and_the_server_the_rest(client):
    with pytest.raises(InvalidArgumentError) as err:
        client.analyze(GOOD, top_k=0)
    assert err.value.request_id is None  # never sent
    assert err.value.details == "options.top_k: must be at least 1 when set (None for no pairs), got 0"
    with pytest.raises(InvalidArgumentError) as err:
        client.analyze(GOOD, layers=[])
    assert err.value.request_id is None and err.value.details.startswith("options.layers: must not be empty")
    with pytest.raises(InvalidArgumentError) as err:
        client.analyze(GOOD, top_k=262145)  # the model's limit: the server's to tell
    assert err.value.request_id and "[1, 262144]" in err.value.details
    assert isinstance(err.value.__cause__, grpc.RpcError)


def test_request_id_is_the_callers_when_given(client):
    with pytest.raises(NotFoundError) as err:
        client.analyze(GOOD, model="gpt-17", metadata=[("x-request-id", "my-trace-42")])
    assert err.value.request_id == "my-trace-42"
    assert str(err.value).endswith("(request id my-trace-42)")


def test_stream_reports_the_same_errors(client):
    with pytest.raises(InvalidArgumentError) as err:
        list(client.analyze_stream(["fine", ""]))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "sequences[1].text" in err.value.details
    assert err.value.request_id


def test_hand_built_messages_with_bad_fields(server, client):
    cases = [
        (pb.AnalyzeRequest(sequences=[pb.Sequence()]), "sequences[0].text"),  # no input at all
        (pb.AnalyzeRequest(sequences=[pb.Sequence(token_ids=pb.TokenIds(ids=[101, 102]), text_pair="x")]),
         "sequences[0].text_pair"),
        (pb.AnalyzeRequest(sequences=[pb.Sequence(token_ids=pb.TokenIds(ids=[101, 102], type_ids=[0]))]),
         "sequences[0].token_ids.type_ids"),
        (pb.AnalyzeRequest(sequences=[pb.Sequence(token_ids=pb.TokenIds(ids=[101, 102], type_ids=[0, 2]))]),
         "sequences[0].token_ids.type_ids[1]"),
        (pb.AnalyzeRequest(sequences=[pb.Sequence(text="x")],
                           options=pb.AnalyzeOptions(attention_dtype=pb.DATA_TYPE_INT64)), "options.attention_dtype"),
        (pb.AnalyzeRequest(sequences=[pb.Sequence(text="x")], options=pb.AnalyzeOptions(attention_dtype=99)),
         "options.attention_dtype"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            _raw(server, request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
    assert client.analyze(GOOD).attention.shape == (6, 12, 7, 7)


def test_unknown_model_in_get_model(client):
    with pytest.raises(NotFoundError) as err:
        client.get_model("nope")
    assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.request_id


def test_response_over_the_limit_is_resource_exhausted_and_stream_still_works():
    with ServerThread(max_response_bytes=2 << 20, max_batch_size=4) as srv, AttentionClient(srv.target) as c:
        text = "word " * 100  # 102 tokens: 6*12*102*102*4 = 3 MB of attention
        with pytest.raises(ResourceExhaustedError) as err:
            c.analyze_batch([text])
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_response_bytes" in err.value.details and "2 MiB" in err.value.details
        assert not err.value.retryable  # the same call would be refused again
        # asking for less fits
        assert c.analyze(text, attention_dtype="float16", layers=[0]).attention.shape == (1, 12, 102, 102)
        with pytest.raises(InvalidArgumentError) as err:
            c.analyze_batch(["a"] * 5)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "limit of 4" in err.value.details


def test_unexpected_failure_is_internal_without_a_stack_trace(server, client, monkeypatch):
    # Make the ONNX Runtime call itself fail, as a corrupt graph or OOM would.
    runtime = server.server.engine.repository.get("").runtime

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail from deep inside")

    monkeypatch.setattr(runtime, "run", broken)
    with pytest.raises(InternalError) as err:
        client.analyze(GOOD)
    assert err.value.code == grpc.StatusCode.INTERNAL and err.value.request_id
    assert "secret" not in err.value.details and "Traceback" not in err.value.details
    assert "incident" in err.value.details
    monkeypatch.undo()
    assert client.analyze(GOOD).attention is not None
