"""Requests built from the SDK's typed arguments, and the bad values refused before any
call with the server's message style."""

import math

import numpy as np
import pytest

from attention_client import InvalidArgumentError
from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client._request import batch_request, build_options, check_timeout, single_request

DEFAULTS = {"layers": None, "heads": None, "attention": True, "attention_dtype": "float32", "hidden_states": True,
            "top_k": None, "min_strength": 0.0, "exclude_special_tokens": False, "word_level": False,
            "head_statistics": False, "rollout": None}


def options(**kwargs):
    return build_options(**{**DEFAULTS, **kwargs})


def test_single_text_is_one_sequence():
    request = single_request("hello world", text_pair=None, model="", options=options(top_k=2, layers=[1]))
    assert len(request.sequences) == 1 and request.sequences[0].text == "hello world"
    assert request.options.HasField("top_k") and request.options.top_k == 2
    assert list(request.options.layers) == [1]


def test_text_pair_is_explicit():
    request = single_request("Where?", text_pair="Here.", model="m", options=options())
    assert (request.sequences[0].text, request.sequences[0].text_pair, request.model) == ("Where?", "Here.", "m")


def test_token_ids_from_a_list_a_tuple_or_an_array():
    for ids in ([101, 7592, 102], (101, 7592, 102), np.array([101, 7592, 102], dtype=np.int32)):
        request = single_request(ids, text_pair=None, model="", options=options())
        assert list(request.sequences[0].token_ids.ids) == [101, 7592, 102]


def test_batch_mixes_texts_and_ids_with_pairs_and_labels():
    request = batch_request(["a", "q", [101, 102], np.array([101, 7592, 102])], text_pairs=[None, "a", None, None],
                            ids=["x", "y", "z", "w"], model="", options=options())
    assert [s.WhichOneof("input") for s in request.sequences] == ["text", "text", "token_ids", "token_ids"]
    assert request.sequences[1].text_pair == "a" and request.sequences[0].text_pair == ""
    assert list(request.sequences[3].token_ids.ids) == [101, 7592, 102]
    assert [s.id for s in request.sequences] == ["x", "y", "z", "w"]


def test_a_generator_is_a_batch():
    request = batch_request((f"text {k}" for k in range(3)), text_pairs=None, ids=None, model="", options=options())
    assert [s.text for s in request.sequences] == ["text 0", "text 1", "text 2"]


def test_defaults_and_dtype_and_fusion_map():
    opts = options()
    assert not opts.HasField("top_k") and opts.attention and opts.hidden_states
    assert list(opts.layers) == [] and list(opts.heads) == []  # None: all
    opts = options(attention_dtype="float16", hidden_states=False, rollout="max", top_k=3, min_strength=0.25,
                   exclude_special_tokens=True, word_level=True, head_statistics=True)
    assert opts.attention_dtype == pb.DATA_TYPE_FLOAT16 and opts.rollout == pb.ROLLOUT_MAX
    assert opts.HasField("hidden_states") and not opts.hidden_states
    assert (opts.top_k, opts.min_strength, opts.exclude_special_tokens, opts.word_level, opts.head_statistics) == (
        3, 0.25, True, True, True)


BAD_OPTIONS = [
    ({"layers": []}, "options.layers: must not be empty", "None (the default) for all layers"),
    ({"layers": 0}, "options.layers: must be a list of layer indices", "got 0"),
    ({"heads": 3}, "options.heads: must be a list of head indices", "got 3"),
    ({"heads": "01"}, "options.heads: must be a list", "'01'"),
    ({"layers": [0, -1]}, "options.layers[1]: layer -1 is out of range", "start at 0"),
    ({"layers": [1.0]}, "options.layers[0]: must be an integer layer index", "1.0"),
    ({"heads": [True]}, "options.heads[0]: must be an integer head index", "True"),
    ({"heads": [3, 3]}, "options.heads[1]: head 3 is listed twice", ""),
    ({"top_k": 0}, "options.top_k: must be at least 1", "got 0"),
    ({"top_k": -3}, "options.top_k: must be at least 1", "got -3"),
    ({"top_k": 2**31}, "options.top_k: must be at least 1", str(2**31)),
    ({"top_k": 2.5}, "options.top_k: must be an integer", "2.5"),
    ({"min_strength": 1.5}, "options.min_strength: must be within [0, 1]", "1.5"),
    ({"min_strength": math.nan}, "options.min_strength: must be within [0, 1]", "nan"),
    ({"min_strength": "0.5"}, "options.min_strength: must be a number", "'0.5'"),
    ({"attention_dtype": "int8"}, "options.attention_dtype: must be 'float32' or 'float16'", "'int8'"),
    ({"rollout": "median"}, "options.rollout: 'median' is not a fusion", "'mean', 'max' or 'min'"),
    ({"attention": "yes"}, "options.attention: must be True or False", "'yes'"),
    ({"word_level": 1}, "options.word_level: must be True or False", "1"),
]


@pytest.mark.parametrize(("kwargs", "start", "words"), BAD_OPTIONS, ids=[str(c[0]) for c in BAD_OPTIONS])
def test_bad_option_values_are_refused_in_the_servers_style(kwargs, start, words):
    with pytest.raises(InvalidArgumentError) as err:
        options(**kwargs)
    assert err.value.details.startswith(start), err.value.details
    assert words in err.value.details
    assert err.value.code.name == "INVALID_ARGUMENT" and err.value.request_id is None and not err.value.retryable
    assert isinstance(err.value, ValueError)  # code that caught ValueError still does


def _single(sequence, **kwargs):
    return single_request(sequence, text_pair=kwargs.pop("text_pair", None), model=kwargs.pop("model", ""),
                          options=options())


def _batch(sequences, **kwargs):
    return batch_request(sequences, text_pairs=kwargs.get("text_pairs"), ids=kwargs.get("ids"),
                         model=kwargs.get("model", ""), options=options())


BAD_SEQUENCES = [
    (lambda: _single(("question?", "answer.")), "sequences[0]: a (text, text_pair) tuple", "text_pair="),
    (lambda: _single(["one", "two"]), "sequences[0]: a list of sequences is a batch", "analyze_batch"),
    (lambda: _single([[101, 102], [101, 7592, 102]]), "sequences[0]: a list of sequences is a batch", "analyze_batch"),
    (lambda: _batch([["a", "b"]]), "sequences[0]: must be text or token ids, not a list of sequences", ""),
    (lambda: _single([1.5, 2.5]), "sequences[0].token_ids.ids: token ids must be", "integers"),
    (lambda: _single(np.zeros((2, 3), dtype=np.int64)), "sequences[0].token_ids.ids", "1-D"),
    (lambda: _single(b"bytes"), "sequences[0]: must be text (str) or token ids", "bytes"),
    (lambda: _single(42), "sequences[0]: must be text (str) or token ids", "int"),
    (lambda: _single([101, 102], text_pair="x"), "sequences[0].text_pair: a text pair goes with text", ""),
    (lambda: _single("x", text_pair=3), "sequences[0].text_pair: must be text or None", "3"),
    (lambda: _single("x", model=None), "model: must be a model name", "None"),
    (lambda: _batch([]), "sequences: empty batch", ""),
    (lambda: _batch("hello"), "sequences: a str is one sequence", "analyze(text)"),
    (lambda: _batch([101, 102, 103]), "sequences: a flat list of ints is one sequence", "analyze(ids)"),
    (lambda: _batch(["a", ("b", "c")]), "sequences[1]: a (text, text_pair) tuple", "text_pairs=[...]"),
    (lambda: _batch(["a", "b"], ids=["only-one"]), "ids: has 1 entries for 2 sequences", ""),
    (lambda: _batch(["a", "b"], ids=["x", 2]), "ids[1]: must be a str", "2"),
    (lambda: _batch(["a", "b"], text_pairs=["x"]), "text_pairs: has 1 entries for 2 sequences", ""),
    (lambda: _batch(["a", [101, 102]], text_pairs=[None, "x"]), "text_pairs[1]: a text pair goes with text", ""),
]


@pytest.mark.parametrize(("build", "start", "words"), BAD_SEQUENCES, ids=[c[1] for c in BAD_SEQUENCES])
def test_bad_sequences_are_refused_with_the_field(build, start, words):
    with pytest.raises(InvalidArgumentError) as err:
        build()
    assert err.value.details.startswith(start), err.value.details
    assert words in err.value.details


@pytest.mark.parametrize("timeout", [0, -1, math.nan, "5", True])
def test_bad_timeouts(timeout):
    with pytest.raises(InvalidArgumentError, match="timeout: must be a positive number of seconds"):
        check_timeout(timeout)
    check_timeout(None)
    check_timeout(0.5)
