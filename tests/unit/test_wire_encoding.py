"""Responses encoded straight to wire bytes parse as the messages they claim to be."""

import numpy as np

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client.tensors import from_tensor
from attention_server.runtime.pairs import top_pairs
from attention_server.runtime.types import SequenceOutput, Tokens
from attention_server.services import converters


def _output(index: int, n: int, dtype=np.float32, hidden=True) -> SequenceOutput:
    rng = np.random.default_rng(index)
    tokens = Tokens(
        ids=np.arange(n, dtype=np.int64) + 100, type_ids=np.zeros(n, np.int64), texts=[f"t{i}" for i in range(n)],
        starts=np.arange(n, dtype=np.int32), ends=np.arange(n, dtype=np.int32) + 1,
        word_index=np.arange(n, dtype=np.int32), special=np.zeros(n, bool), segment=np.zeros(n, np.int32),
    )
    return SequenceOutput(
        index=index, id=f"seq-{index}", tokens=tokens, layers=[0, 3], heads=[1, 2, 5],
        attention=rng.random((2, 3, n, n)).astype(dtype),
        hidden_states=rng.random((n, 8)).astype(np.float32) if hidden else None,
        pairs=top_pairs(rng.random((2, 3, n, n)).astype(np.float32), [0, 3], [1, 2, 5], k=3, min_strength=0.5),
    )


def test_encoded_result_parses_with_every_field():
    out = _output(2, 200)  # > 127 tokens: multi-byte varint lengths
    msg = pb.SequenceResult.FromString(converters.encode_result(out))
    assert (msg.index, msg.id, list(msg.layers), list(msg.heads)) == (2, "seq-2", [0, 3], [1, 2, 5])
    assert [t.text for t in msg.tokens] == out.tokens.texts
    assert msg.tokens[7].start == 7 and msg.tokens[7].end == 8
    np.testing.assert_array_equal(from_tensor(msg.attention), out.attention)
    np.testing.assert_array_equal(from_tensor(msg.hidden_states), out.hidden_states)
    assert [(hp.head.layer, hp.head.index) for hp in msg.pairs] == [(0, 1), (0, 2), (0, 5), (3, 1), (3, 2), (3, 5)]
    for row, hp in enumerate(msg.pairs):
        expected = out.pairs.head_pairs(row)
        assert [(p.from_index, p.to_index) for p in hp.pairs] == [(f, t) for f, t, _ in expected]
        np.testing.assert_array_equal([p.strength for p in hp.pairs], np.float32([s for _, _, s in expected]))
    assert any(p.from_index >= 128 for hp in msg.pairs for p in hp.pairs)  # two-byte varints were exercised


def test_unary_response_joins_encoded_results():
    outs = [_output(0, 3, np.float16, hidden=False), _output(1, 130)]
    parts = converters.analyze_response_parts("m", [converters.result_parts(o) for o in outs])
    raw = b"".join(parts)
    assert converters.parts_size(parts) == len(raw)
    msg = pb.AnalyzeResponse.FromString(raw)
    assert msg.model == "m" and [r.index for r in msg.results] == [0, 1]
    assert from_tensor(msg.results[0].attention).dtype == np.float16
    assert not msg.results[0].HasField("hidden_states")
    np.testing.assert_array_equal(from_tensor(msg.results[1].attention), outs[1].attention)


def test_non_contiguous_and_big_endian_arrays_are_encoded_correctly():
    out = _output(0, 4)
    out.attention = np.asfortranarray(out.attention).astype(">f4")
    msg = pb.SequenceResult.FromString(converters.encode_result(out))
    np.testing.assert_array_equal(from_tensor(msg.attention), out.attention.astype("<f4"))


def test_vectorized_pair_encoding_equals_the_protobuf_encoding():
    rng = np.random.default_rng(3)
    for n, k, layers, heads in [(5, 3, [0], [0]), (300, 7, [0, 2], [0, 5, 200]), (20, 400, [130], [1])]:
        att = rng.random((len(layers), len(heads), n, n)).astype(np.float32)
        table = top_pairs(att, layers, heads, k=k, min_strength=0.3)
        fast = pb.SequenceResult.FromString(converters._pair_table_bytes(table))
        slow = pb.SequenceResult.FromString(converters._pair_table_pb(table))
        assert fast == slow and len(fast.pairs) == len(layers) * len(heads)
