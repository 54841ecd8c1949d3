import numpy as np
import pytest

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client._request import build_request


def test_single_text_is_one_sequence_and_flagged_single():
    request, single = build_request("hello world", top_k=2, layers=[1])
    assert single and len(request.sequences) == 1 and request.sequences[0].text == "hello world"
    assert request.options.HasField("top_k") and request.options.top_k == 2
    assert list(request.options.layers) == [1]


def test_list_mixes_text_pairs_and_ids():
    request, single = build_request(["a", ("q", "a"), [101, 102], np.array([101, 7592, 102])], ids=["x", "y", "z", "w"])
    assert not single
    kinds = [s.WhichOneof("input") for s in request.sequences]
    assert kinds == ["text", "text", "token_ids", "token_ids"]
    assert request.sequences[1].text_pair == "a"
    assert list(request.sequences[3].token_ids.ids) == [101, 7592, 102]
    assert [s.id for s in request.sequences] == ["x", "y", "z", "w"]


def test_a_flat_list_of_ints_is_one_sequence_of_ids():
    request, single = build_request([101, 7592, 102])
    assert single and list(request.sequences[0].token_ids.ids) == [101, 7592, 102]


def test_top_k_unset_means_no_pairs_and_dtype_maps():
    request, _ = build_request("x", attention_dtype="float16", hidden_states=False)
    assert not request.options.HasField("top_k")
    assert request.options.attention_dtype == pb.DATA_TYPE_FLOAT16
    assert request.options.HasField("hidden_states") and not request.options.hidden_states


def test_bad_arguments_fail_before_any_call():
    with pytest.raises(ValueError, match="attention_dtype"):
        build_request("x", attention_dtype="int8")
    with pytest.raises(TypeError):
        build_request([[1.5, 2.5]])
    with pytest.raises(ValueError, match="ids has 1 entries for 2"):
        build_request(["a", "b"], ids=["only-one"])
