"""Results hand out writable arrays: decoded as views into the received bytes (no copy),
copied out of them once, on the first read of any array of the result."""

import pickle
import threading

import numpy as np
import pytest

from attention_client import AnalyzeResult, InvalidArgumentError
from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client._wire import split_response
from attention_client.tensors import to_tensor


def _response(n: int = 5) -> bytes:
    rng = np.random.default_rng(0)
    results = []
    for index in range(2):
        msg = pb.SequenceResult(index=index, layers=[0, 2], heads=[1, 3, 5])
        to_tensor(rng.random((2, 3, n, n)).astype(np.float32), msg.attention)
        to_tensor(rng.random((n, 8)).astype(np.float32), msg.hidden_states)
        to_tensor(rng.random((6, n, n)).astype(np.float32), msg.rollout)
        results.append(msg)
    return pb.AnalyzeResponse(results=results).SerializeToString()


def _results(raw: bytes) -> list[AnalyzeResult]:
    return [AnalyzeResult.from_parts(m, t) for m, t in split_response(raw)]


def test_arrays_are_writable_and_hold_the_received_numbers():
    raw = _response()
    views = [t for _, t in split_response(raw)]
    for result, tensors in zip(_results(raw), views, strict=True):
        for name in ("attention", "hidden_states", "rollout"):
            array = getattr(result, name)
            assert array.flags.writeable and array.flags.owndata and array.flags.c_contiguous
            np.testing.assert_array_equal(array, tensors[name])
            assert not np.shares_memory(array, tensors[name])


def test_the_copy_is_made_once_and_writes_stay():
    [result, other] = _results(_response())
    attention = result.attention
    attention[0, 0, 0, :] = 0.0
    assert result.attention is attention and result.attention[0, 0, 0].sum() == 0.0
    assert result.head_attention(0, 1)[0].sum() == 0.0  # a view of the same array
    assert result.hidden_states.flags.owndata  # the first read copied all of this result's arrays
    assert other.attention[0, 0, 0].sum() > 0  # another result is its own


def test_torch_style_consumers_see_a_writable_buffer():
    [result, _] = _results(_response())
    memoryview(result.attention).tobytes()  # a writable buffer: what torch.from_numpy needs without a warning
    assert not memoryview(result.attention).readonly


def test_results_from_parsed_messages_behave_the_same():
    msg = pb.AnalyzeResponse.FromString(_response()).results[0]
    result = AnalyzeResult.from_pb(msg)
    assert result.attention.flags.writeable and result.rollout.flags.writeable
    assert result.word_attention is None


def test_concurrent_first_reads_get_the_same_array():
    [result, _] = _results(_response(n=64))
    seen: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: seen.append(result.attention)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a is seen[0] for a in seen)


def test_arrays_not_asked_for_are_none_and_head_attention_says_why():
    msg = pb.SequenceResult(layers=[0], heads=[1])
    msg.tokens.add(id=101, text="[CLS]", special=True)
    result = AnalyzeResult.from_pb(msg)
    assert result.attention is None and result.hidden_states is None and result.rollout is None
    with pytest.raises(InvalidArgumentError, match="attention: not in this result"):
        result.head_attention(0, 1)
    [full, _] = _results(_response())
    with pytest.raises(InvalidArgumentError, match=r"layer: 1 is not in this result \(layers \[0, 2\]\)"):
        full.head_attention(1, 1)
    with pytest.raises(InvalidArgumentError, match=r"head: 0 is not in this result"):
        full.head_attention(0, 0)


def test_results_pickle_with_their_arrays():
    [result, _] = _results(_response())
    result.attention[0, 0, 0, 0] = 42.0
    back = pickle.loads(pickle.dumps(result))
    assert back.attention[0, 0, 0, 0] == 42.0 and back.layers == [0, 2] and back.heads == [1, 3, 5]
    [fresh, _] = _results(_response())
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(fresh)).rollout, fresh.rollout)
