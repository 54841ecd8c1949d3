"""The SDK's zero-copy decoding gives what protobuf parsing gives."""

import numpy as np
import pytest

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client._wire import split_response, split_result
from attention_client.results import AnalyzeResult
from attention_client.tensors import TensorError, to_tensor


def _result(index: int, n: int) -> pb.SequenceResult:
    rng = np.random.default_rng(index)
    msg = pb.SequenceResult(index=index, id=f"s{index}", layers=[0, 3], heads=[1])
    msg.tokens.add(id=101, text="[CLS]", start=-1, end=-1, word_index=-1, special=True)
    msg.pairs.add().pairs.add(from_index=1, to_index=0, strength=0.5)
    to_tensor(rng.random((2, 1, n, n)).astype(np.float16), msg.attention)
    to_tensor(rng.random((n, 8)).astype(np.float32), msg.hidden_states)
    to_tensor(rng.random((6, n, n)).astype(np.float32), msg.rollout)
    msg.words.add(text="hello", first_token=1, end_token=2)
    return msg


def test_split_response_equals_protobuf_parsing():
    response = pb.AnalyzeResponse(model="m", results=[_result(0, 3), _result(1, 200)])
    raw = response.SerializeToString()
    parts = split_response(raw)
    assert len(parts) == 2
    for (msg, tensors), expected in zip(parts, response.results, strict=True):
        ours = AnalyzeResult.from_parts(msg, tensors)
        theirs = AnalyzeResult.from_pb(expected)
        assert ours.tokens == theirs.tokens and ours.pairs == theirs.pairs and ours.words == theirs.words
        for name in ("attention", "hidden_states", "rollout"):
            np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))
            assert getattr(ours, name).dtype == getattr(theirs, name).dtype
        assert ours.word_attention is None
        assert not tensors["attention"].flags.owndata and not tensors["attention"].flags.writeable  # a view into raw


def test_a_stream_message_is_one_result():
    msg = _result(4, 5)
    parsed, tensors = split_result(msg.SerializeToString())
    assert parsed.index == 4 and set(tensors) == {"attention", "hidden_states", "rollout"}
    assert not parsed.HasField("attention")  # tensors are not copied into the message


def test_corrupt_tensors_are_refused():
    msg = pb.SequenceResult(attention=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 2], data=b"\0" * 12))
    with pytest.raises(TensorError, match="needs 16 bytes"):
        split_result(msg.SerializeToString())
    with pytest.raises(TensorError):
        split_result(_result(0, 3).SerializeToString()[:-3])
