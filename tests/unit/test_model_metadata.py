"""What model.json says of a model (old files included), how it reaches ModelInfo and the
Open Inference Protocol, and the pieces that depend on it: roles of causal models, word
grouping of byte-level vocabularies, the request options for per-layer outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from attention_client._request import build_options
from attention_client.results import ModelInfo
from attention_server.errors import ModelLoadError
from attention_server.runtime.engine import Limits
from attention_server.runtime.heads import STATISTICS, group_words, head_statistics
from attention_server.runtime.roles import label, rules_for
from attention_server.runtime.tokenizer import TextTokenizer, word_start_marker
from attention_server.runtime.types import ModelMetadata
from attention_server.services.converters import model_info_to_pb
from attention_server.services.oip_codec import model_config

BASE = {
    "name": "m", "source": "s", "architecture": "BertModel", "num_layers": 2, "num_heads": 4, "hidden_size": 32,
    "max_positions": 64, "vocab_size": 100, "special_tokens": {"cls": {"text": "[CLS]", "id": 1}},
    "pad_token_id": 0, "continuing_subword_prefix": "##", "inputs": ["input_ids", "attention_mask"],
    "outputs": ["last_hidden_state", "attentions"], "opset": 18, "onnx_file": "model.onnx",
    "tokenizer_file": "tokenizer.json", "sha256": "0" * 64,
}
LLAMA = {**BASE, "architecture": "LlamaForCausalLM", "model_type": "llama", "causal": True, "num_key_value_heads": 2,
         "position_embedding": "rotary", "continuing_subword_prefix": None,
         "special_tokens": {"bos": {"text": "<s>", "id": 1}, "eos": {"text": "</s>", "id": 2}},
         "hidden_states_outputs": ["hidden_states_0", "hidden_states_1", "hidden_states_2"],
         "query_outputs": ["query_0", "query_1"], "key_outputs": ["key_0", "key_1"]}


def metadata(tmp_path: Path, raw: dict[str, object]) -> ModelMetadata:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(raw))
    return ModelMetadata.from_file(path)


def test_an_old_model_json_reads_with_the_defaults(tmp_path):
    meta = metadata(tmp_path, BASE)
    assert (meta.causal, meta.num_key_value_heads, meta.position_embedding) == (False, 4, "absolute")
    assert meta.hidden_states_outputs == meta.query_outputs == meta.key_outputs == meta.extra_outputs == []
    assert meta.head_dim == 8 and [meta.kv_head(h) for h in range(4)] == [0, 1, 2, 3]


def test_grouped_query_heads_read_their_kv_head_in_repeat_kv_order(tmp_path):
    meta = metadata(tmp_path, LLAMA)
    assert meta.causal and meta.position_embedding == "rotary" and meta.continuing_subword_prefix == ""
    assert [meta.kv_head(h) for h in range(4)] == [0, 0, 1, 1]  # HF repeat_kv: each kv head repeated in place
    assert meta.extra_outputs == [*LLAMA["hidden_states_outputs"], "query_0", "query_1", "key_0", "key_1"]


@pytest.mark.parametrize(("change", "message"), [
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_states_outputs": ["a", "b"]}, "hidden_states_outputs lists 2 outputs; the model has 3"),
    ({"key_outputs": []}, "go together"),
])
def test_inconsistent_model_json_is_a_load_error_naming_the_field(tmp_path, change, message):
    with pytest.raises(ModelLoadError, match=message):
        metadata(tmp_path, {**LLAMA, **change})


@pytest.mark.parametrize(("change", "message"), [
    ({"causal": "false"}, "causal must be true or false, got 'false'"),  # would read as truthy
    ({"num_key_value_heads": -2}, "num_key_value_heads must be an integer >= 0"),  # was taken as num_heads
    ({"num_heads": 0, "num_key_value_heads": 0}, "num_heads must be a positive integer"),  # was ZeroDivisionError
    ({"position_embedding": 5}, "position_embedding must be one of"),
    ({"query_key_scaling": ["x", "y"]}, "query_key_scaling must be a list of positive numbers"),
    ({"query_outputs": "query_0", "key_outputs": "key_0"}, "query_outputs must be a list of output names"),
])
def test_model_json_of_the_wrong_type_is_a_load_error_not_an_internal_error_later(tmp_path, change, message):
    """Before: these loaded, and GetModel/ListModels (every model's) answered INTERNAL, or
    `causal: "false"` made a model causal."""
    with pytest.raises(ModelLoadError, match=message):
        metadata(tmp_path, {**LLAMA, **change})


def test_per_layer_outputs_must_have_the_shapes_model_json_promises(tmp_path):
    """Before: query_outputs naming another output, or a wrong head_dim, loaded; every
    query_key call was then INTERNAL (IndexError) or its size estimate wrong."""
    from attention_server.runtime.repository import check_output_shapes

    meta = metadata(tmp_path, LLAMA)
    shapes: dict[str, list[int | str | None]] = {
        **{f"hidden_states_{k}": ["batch", "sequence", 32] for k in range(3)},
        **{f"{kind}_{k}": ["batch", 4, "sequence", 8] for kind in ("query", "key") for k in range(2)},
        "attentions": ["batch", 2, 4, "sequence", "sequence"]}
    check_output_shapes(Path("m.onnx"), meta, shapes)
    with pytest.raises(ModelLoadError, match=r"output 'query_0' \(query_outputs.*\[\*, 4, \*, 16\]"):
        check_output_shapes(Path("m.onnx"), metadata(tmp_path, {**LLAMA, "head_dim": 16}), shapes)
    with pytest.raises(ModelLoadError, match=r"output 'attentions' \(query_outputs"):
        check_output_shapes(Path("m.onnx"), metadata(tmp_path, {**LLAMA, "query_outputs": ["attentions"] * 2}),
                            shapes)
    with pytest.raises(ModelLoadError, match=r"output 'hidden_states_0' \(hidden_states_outputs"):
        check_output_shapes(Path("m.onnx"), metadata(tmp_path, {**LLAMA, "hidden_size": 64}), shapes)


def test_model_info_and_model_config_say_the_same(tmp_path):
    meta = metadata(tmp_path, LLAMA)
    info = ModelInfo.from_pb(model_info_to_pb(meta, Limits()))
    assert (info.causal, info.num_key_value_heads, info.position_embedding, info.model_type) == \
        (True, 2, "rotary", "llama")
    assert info.supports_hidden_states_layers and info.supports_query_key and info.head_dim == 8
    assert [h.kv_head for h in info.heads] == [0, 0, 1, 1] * 2
    assert info.special_tokens == {"bos": ("<s>", 1), "eos": ("</s>", 2)}
    parameters = {k: v.string_value for k, v in model_config(meta, 64, 1, 0).parameters.items()}
    assert parameters["causal"] == "true" and parameters["num_key_value_heads"] == "2"
    assert parameters["kv_heads"] == "0,0,1,1" and parameters["position_embedding"] == "rotary"
    assert parameters["special_tokens"] == "bos=1,eos=2" and parameters["supports_query_key"] == "true"
    old = {k: v.string_value for k, v in model_config(metadata(tmp_path, BASE), 64, 1, 0).parameters.items()}
    assert old["causal"] == "false" and old["supports_query_key"] == "false" and old["kv_heads"] == "0,1,2,3"


def test_a_causal_model_is_never_given_a_role_that_looks_ahead():
    stats = {name: 0.0 for name in STATISTICS} | {"to_next": 0.9, "entropy_relative": 0.8}
    assert label(stats) == ("next_token", 0.9)
    assert label(stats, causal=True) == ("broad", 0.8)
    assert "next_token" not in {rule[0] for rule in rules_for(True)}


def test_causal_relative_entropy_is_over_what_each_token_can_see(tmp_path):
    n = 5
    uniform_causal = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    tokens = _byte_level_tokenizer(tmp_path).from_ids(np.arange(n), np.zeros(n, np.int64))
    encoder_view = head_statistics(uniform_causal[None, None], tokens, None, None)
    causal_view = head_statistics(uniform_causal[None, None], tokens, None, None, causal=True)
    relative = STATISTICS.index("entropy_relative")
    assert causal_view[0, 0, relative] == pytest.approx(1.0)
    assert encoder_view[0, 0, relative] < 0.6


VOCAB = {"Hello": 0, "Ġworld": 1, "Ġwor": 2, "ld": 3, "!": 4, "<|endoftext|>": 5}


def _byte_level_tokenizer(folder: Path) -> TextTokenizer:
    tok = Tokenizer(models.BPE(vocab=VOCAB, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(folder / "tokenizer.json"))
    meta = ModelMetadata(**{**BASE, "continuing_subword_prefix": None,  # type: ignore[arg-type]
                            "special_tokens": {"eos": {"text": "<|endoftext|>", "id": 5}}})
    return TextTokenizer(folder / "tokenizer.json", meta)


def test_byte_level_words_start_at_the_marker(tmp_path):
    tokenizer = _byte_level_tokenizer(tmp_path)
    assert tokenizer.word_start == "\u0120"
    tokens = tokenizer.from_ids(np.array([0, 2, 3, 4, 1, 5]), np.zeros(6, np.int64))
    assert tokens.word_index.tolist() == [0, 1, 1, 1, 2, -1]  # Hello | Ġwor ld ! | Ġworld | <|endoftext|>
    words = group_words(tokens, "", tokenizer.word_start)
    assert words.texts == ["Hello", "world!", "world", "<|endoftext|>"]
    assert words.special.tolist() == [False, False, False, True]


def test_word_start_markers_of_the_tokenizer_families():
    assert word_start_marker({"pre_tokenizer": {"type": "ByteLevel"}}) == "\u0120"
    assert word_start_marker({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Metaspace", "replacement": "\u2581"}]}}) == "\u2581"
    assert word_start_marker({"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "},
                                                  "content": "\u2581"}]}}) == "\u2581"
    assert word_start_marker({"pre_tokenizer": {"type": "BertPreTokenizer"}}) is None


DEFAULTS = {"layers": None, "heads": None, "attention": True, "attention_dtype": "float32", "hidden_states": True,
            "top_k": None, "min_strength": 0.0, "exclude_special_tokens": False, "word_level": False,
            "head_statistics": False, "rollout": None}


def test_request_options_for_per_layer_outputs():
    options = build_options(**DEFAULTS, hidden_states_layers=[0, 6], query_key=True)
    assert list(options.hidden_states_layers) == [0, 6] and options.query_key
    plain = build_options(**DEFAULTS)
    assert not plain.hidden_states_layers and not plain.query_key
    from attention_client import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=r"options.hidden_states_layers: must not be empty.*None"):
        build_options(**DEFAULTS, hidden_states_layers=[])
    with pytest.raises(InvalidArgumentError, match=r"options.hidden_states_layers\[1\]: layer 0 is listed twice"):
        build_options(**DEFAULTS, hidden_states_layers=[0, 0])
    with pytest.raises(InvalidArgumentError, match=r"options\.query_key: must be True or False"):
        build_options(**DEFAULTS, query_key=1)  # type: ignore[arg-type]


def test_no_roles_rather_than_made_up_ones_when_no_probe_sentence_fits(tmp_path, caplog):
    """Before: a model with fewer positions than every probe sentence got all-zero statistics,
    and so the role "local" (score 0) on every head, stored in roles.json as if measured."""
    from attention_server.runtime.roles import compute_roles

    class Long:
        def __len__(self) -> int:
            return 10_000

    class Tok:
        def encode_batch(self, items):
            return [Long() for _ in items]

    class NoRun:
        def run(self, *args, **kwargs):
            raise AssertionError("nothing fits, so nothing runs")

    with caplog.at_level("WARNING", logger="attention_server.runtime.roles"):
        assert compute_roles(NoRun(), Tok(), metadata(tmp_path, LLAMA)) == []  # type: ignore[arg-type]
    assert "none of the" in caplog.text and "fits its 64 positions; no roles" in caplog.text
