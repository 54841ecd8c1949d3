"""attention.v1.AttentionService under field-level mutations of valid requests
and hand-written wire bytes. One test per RPC; every reply is held to the
properties in harness.FuzzServer.check."""

from __future__ import annotations

import grpc
from hypothesis import given
from hypothesis import strategies as st

from attention_client._proto.attention.v1 import attention_pb2 as pb
from tests.fuzz import strategies as s
from tests.fuzz.harness import ATTENTION, FuzzServer, check_analyze_response, check_sequence_result, examples

ANALYZE = ATTENTION + "Analyze"


VALID_TEXTS = ["hello world", "The cat sat on the mat.", "naïve café, déjà vu!", "Don't stop-believing..."]


@st.composite
def valid_sequence(draw: st.DrawFn) -> pb.Sequence:
    """Text (edge-case unicode included) or in-vocabulary token ids, short."""
    seq = pb.Sequence(id=draw(st.one_of(st.just(""), st.text(max_size=12))))
    if draw(st.integers(0, 3)):
        seq.text = draw(st.one_of(st.sampled_from(VALID_TEXTS), s.texts(120)))
        if draw(st.integers(0, 4)) == 0:
            seq.text_pair = draw(st.one_of(st.sampled_from(VALID_TEXTS), s.texts(60)))
    else:
        ids = draw(st.lists(st.integers(999, 30521), min_size=0, max_size=20))
        seq.token_ids.ids.extend([101, *ids, 102])
        if draw(st.booleans()):
            seq.token_ids.type_ids.extend([draw(st.integers(0, 1))] * (len(ids) + 2))
    return seq


@st.composite
def valid_options(draw: st.DrawFn) -> pb.AnalyzeOptions:
    opts = pb.AnalyzeOptions(
        layers=draw(st.lists(st.integers(0, 5), unique=True, max_size=3)),
        heads=draw(st.lists(st.integers(0, 11), unique=True, max_size=3)),
        attention_dtype=draw(st.sampled_from([0, 1, 2])),
        min_strength=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])),
        exclude_special_tokens=draw(st.booleans()),
        word_level=draw(st.booleans()),
        head_statistics=draw(st.booleans()),
        rollout=draw(st.sampled_from([0, 0, 1, 2, 3])),
    )
    for name in ("attention", "hidden_states"):
        value = draw(st.sampled_from([None, True, False]))
        if value is not None:
            setattr(opts, name, value)
    if draw(st.booleans()):
        opts.top_k = draw(st.integers(1, 12))
    return opts


def _mutate_sequence(draw: st.DrawFn, seq: pb.Sequence) -> None:
    how = draw(st.sampled_from(["ids", "length", "type_ids", "none", "pair_with_ids", "huge_text", "text"]))
    if how == "ids":
        seq.token_ids.ids.extend(draw(st.lists(s.int64s(), min_size=1, max_size=4)))
    elif how == "length":
        # At and past the model's 512 positions (cheap: no matrices are asked for, see below).
        n = draw(st.sampled_from([510, 511, 512, 513, 600, 5000]))
        seq.token_ids.CopyFrom(pb.TokenIds(ids=[101] + [2000] * (n - 2) + [102]))
    elif how == "type_ids":
        # Of the ids' length (so only the values are wrong) or of another length.
        n = len(seq.token_ids.ids) or 3
        if not seq.token_ids.ids:
            seq.token_ids.ids.extend([101, 2000, 102])
        del seq.token_ids.type_ids[:]
        seq.token_ids.type_ids.extend(draw(st.one_of(st.lists(s.int64s(), min_size=n, max_size=n),
                                                     st.lists(st.integers(0, 1), max_size=n + 3))))
    elif how == "none":
        seq.ClearField("text")
        seq.ClearField("token_ids")
    elif how == "pair_with_ids":
        seq.token_ids.ids.extend([101, 102])
        seq.text_pair = draw(s.texts(20))
    elif how == "huge_text":
        seq.text = draw(st.one_of(s.huge_strings(), st.sampled_from(["word " * 600, "a " * 511, "é" * 513])))
    else:
        seq.text = draw(s.texts())


def _mutate_options(draw: st.DrawFn, opts: pb.AnalyzeOptions) -> None:
    how = draw(st.sampled_from(["layers", "heads", "many_layers", "dtype", "rollout", "top_k", "min_strength"]))
    if how == "layers":
        opts.layers.extend(draw(st.lists(s.int32s(), min_size=1, max_size=4)))
    elif how == "heads":
        opts.heads.extend(draw(st.lists(s.int32s(), min_size=1, max_size=4)))
    elif how == "many_layers":
        opts.layers.extend(draw(st.sampled_from([list(range(6)) * 2, list(range(5000)), [0] * 100_000])))
    elif how == "dtype":
        opts.attention_dtype = draw(s.int32s())  # an open enum: any int32 arrives
    elif how == "rollout":
        opts.rollout = draw(s.int32s())
    elif how == "top_k":
        opts.top_k = draw(s.int32s())
    else:
        opts.min_strength = draw(s.floats32())


def _heavy(request: pb.AnalyzeRequest) -> bool:
    return any(len(q.token_ids.ids) > 64 or len(q.text) > 300 for q in request.sequences)


@st.composite
def analyze_requests(draw: st.DrawFn) -> bytes:
    """A valid request, then 0-3 mutations of its fields; serialized, sometimes with
    wire-level damage (invalid UTF-8 in a string field, unknown fields, corruption)."""
    request = pb.AnalyzeRequest(model=draw(st.sampled_from(["", s.MODEL])),
                                sequences=draw(st.lists(valid_sequence(), min_size=1, max_size=3)))
    if draw(st.integers(0, 3)):
        request.options.CopyFrom(draw(valid_options()))
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 3]))):
        how = draw(st.sampled_from(["sequence", "sequence", "options", "options", "model", "batch"]))
        if how == "sequence" and request.sequences:
            _mutate_sequence(draw, request.sequences[draw(st.integers(0, len(request.sequences) - 1))])
        elif how == "options":
            _mutate_options(draw, request.options)
        elif how == "model":
            request.model = draw(s.names())
        else:  # around max_batch_size (64), or empty
            n = draw(st.sampled_from([0, 63, 64, 65, 1000]))
            del request.sequences[:]
            request.sequences.extend([pb.Sequence(text="hi")] * n)
    if _heavy(request):
        # Long inputs are about the limits, not about a 100 MB reply.
        request.options.attention = request.options.hidden_states = False
        request.options.word_level = request.options.head_statistics = False
        request.options.rollout = 0
    data = request.SerializeToString()
    extra = draw(st.sampled_from(["none"] * 6 + ["bad_utf8", "unknown", "corrupt"]))
    if extra == "bad_utf8":
        # A string field holding what protobuf refuses: model, or a sequence's text / text_pair / id.
        where = draw(st.sampled_from(["model", "text", "text_pair", "id"]))
        payload = draw(s.bad_utf8())
        data += s.ld(1, payload) if where == "model" else s.ld(2, s.ld({"text": 1, "text_pair": 3, "id": 4}[where],
                                                                           payload))
    elif extra == "unknown":
        data += draw(s.unknown_fields())
    elif extra == "corrupt":
        data = draw(s.corrupt(data))
    return data


@examples(200)
@given(payload=analyze_requests())
def test_analyze(fuzz_server: FuzzServer, payload: bytes) -> None:
    reply = fuzz_server.unary(ANALYZE, payload)
    fuzz_server.check(reply, payload)
    if reply.code == grpc.StatusCode.OK:
        check_analyze_response(reply.messages[0], payload)


@examples(100)
@given(payload=analyze_requests())
def test_analyze_stream(fuzz_server: FuzzServer, payload: bytes) -> None:
    reply = fuzz_server.server_stream(ATTENTION + "AnalyzeStream", payload)
    fuzz_server.check(reply, payload)
    results = [pb.SequenceResult.FromString(m) for m in reply.messages]
    for result in results:
        check_sequence_result(result)
    if reply.code == grpc.StatusCode.OK:
        sent = pb.AnalyzeRequest.FromString(payload)
        assert [r.index for r in results] == list(range(len(sent.sequences)))


@examples(60)
@given(payload=st.one_of(s.unknown_fields(8), st.just(b"")))
def test_list_models(fuzz_server: FuzzServer, payload: bytes) -> None:
    """ListModelsRequest has no fields: everything sent is an unknown field."""
    fuzz_server.check(fuzz_server.unary(ATTENTION + "ListModels", payload), payload)


@st.composite
def get_model_requests(draw: st.DrawFn) -> bytes:
    data = pb.GetModelRequest(name=draw(s.names())).SerializeToString()
    extra = draw(st.sampled_from(["none", "bad_utf8", "unknown", "corrupt"]))
    if extra == "bad_utf8":
        data += s.ld(1, draw(s.bad_utf8()))
    elif extra == "unknown":
        data += draw(s.unknown_fields())
    elif extra == "corrupt":
        data = draw(s.corrupt(data))
    return data


@examples(150)
@given(payload=get_model_requests())
def test_get_model(fuzz_server: FuzzServer, payload: bytes) -> None:
    fuzz_server.check(fuzz_server.unary(ATTENTION + "GetModel", payload), payload)


def test_server_healthy_at_end(fuzz_server: FuzzServer) -> None:
    """After every example above: RSS under idle + 1 GiB, no traceback logged."""
    fuzz_server.assert_healthy_at_end()
