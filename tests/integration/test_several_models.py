"""One server, several models: the default MiniLM, a BERT, a GPT-2 and a Llama-style model
(grouped-query attention) exported from tiny random models, and an old export. Every call
goes to the model it names, with that model's numbers (the same as ONNX Runtime gives in
this process for the sequence alone), and every protocol says what each model is."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from attention_client import AttentionClient
from attention_client.cli import main as cli_main
from tests.helpers import MODEL_DIR, ServerThread
from tests.integration.several_models import OLD, TINY, build_repository, model_json, run_onnx

DEFAULT = MODEL_DIR.name


@pytest.fixture(scope="module")
def repository(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tiny_repository, tmp_path_factory.mktemp("several") / "repository")


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerThread]:
    with ServerThread(model_repository=repository, metrics_port=-1) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[AttentionClient]:
    with AttentionClient(server.target, timeout=60) as c:
        yield c


def test_one_server_serves_every_folder_and_says_what_each_model_is(client: AttentionClient) -> None:
    models = {m.name: m for m in client.list_models()}
    assert sorted(models) == sorted([DEFAULT, *TINY, OLD])
    assert client.get_model().name == DEFAULT  # the default stays the default
    shape = {name: (m.architecture, m.causal, m.num_key_value_heads, m.position_embedding, m.num_layers, m.num_heads)
             for name, m in models.items()}
    assert shape[DEFAULT] == ("BertModel", False, 12, "absolute", 6, 12)
    assert shape["tiny-bert"][1:] == (False, 4, "absolute", 2, 4)
    assert shape["tiny-gpt2"][1:] == (True, 4, "absolute", 2, 4)
    assert shape["tiny-llama"][1:] == (True, 2, "rotary", 2, 4)
    assert shape[OLD][1:] == (False, 4, "absolute", 2, 4)  # old model.json: the defaults
    assert [h.kv_head for h in models["tiny-llama"].heads] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [h.kv_head for h in models["tiny-gpt2"].heads] == [0, 1, 2, 3] * 2
    assert "cls" in models["tiny-bert"].special_tokens and "cls" not in models["tiny-gpt2"].special_tokens
    assert models["tiny-llama"].special_tokens["bos"][0] == "<s>"
    assert not models[OLD].supports_query_key and models["tiny-gpt2"].supports_query_key
    for m in models.values():  # roles for every model, none that looks ahead for a decoder
        assert all(h.role for h in m.heads), m.name
        if m.causal:
            assert "next_token" not in {h.role for h in m.heads}


def test_each_call_goes_to_its_model_with_its_numbers(client: AttentionClient, repository: Path) -> None:
    rng = np.random.default_rng(7)
    for name in (DEFAULT, *TINY):
        meta = model_json(repository, name)
        vocab = int(meta["vocab_size"])  # type: ignore[call-overload]
        batch = [rng.integers(3, vocab, size=n).tolist() for n in (11, 5)]  # padded together on the server
        results = client.analyze_batch(batch, model=name)
        for ids, result in zip(batch, results, strict=True):
            expected = run_onnx(repository, name, ids, ["attentions", "last_hidden_state"])
            assert [t.id for t in result.tokens] == ids
            assert result.attention is not None and result.hidden_states is not None
            np.testing.assert_allclose(result.attention, expected["attentions"][0], atol=2e-5, err_msg=name)
            np.testing.assert_allclose(result.hidden_states, expected["last_hidden_state"][0], atol=1e-4,
                                       err_msg=name)
            if meta.get("causal"):
                assert not np.triu(result.attention, k=1).any(), f"{name}: attention above the diagonal"


def test_byte_level_and_sentencepiece_words(client: AttentionClient) -> None:
    text = "Hello world, the cat sat."
    gpt2 = client.analyze(text, model="tiny-gpt2", word_level=True, attention=False, hidden_states=False)
    assert [w.text for w in gpt2.words] == ["Hello", "world", ",", "the", "cat", "sat", "."]
    by_ids = client.analyze([t.id for t in gpt2.tokens], model="tiny-gpt2", word_level=True, attention=False,
                            hidden_states=False)
    assert [w.text for w in by_ids.words] == ["Hello", "world,", "the", "cat", "sat."]  # ids: the marker alone
    llama = client.analyze(text, model="tiny-llama", word_level=True, top_k=2, exclude_special_tokens=True,
                           attention=False, hidden_states=False)
    texts = [w.text for w in llama.words]
    assert texts[0] == "<s>" and llama.words[0].special and "Hello" in texts and not any("\u2581" in t for t in texts)
    bos = 0
    assert all(p.from_index != bos and p.to_index != bos for hp in llama.word_pairs for p in hp.pairs)


# tritonclient's generated modules clash with the server's in one process: run it in its own.
TRITON_CONFIGS = """
import json, sys
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
grpc_target, http_target = sys.argv[1:3]
out = {}
for name in sys.argv[3:]:
    g = grpcclient.InferenceServerClient(grpc_target).get_model_config(name, as_json=True)["config"]
    h = httpclient.InferenceServerClient(http_target).get_model_config(name)
    out[name] = {"grpc": g["parameters"], "http": h["parameters"], "inputs": [t["name"] for t in h["input"]]}
try:
    grpcclient.InferenceServerClient(grpc_target).infer("tiny-gpt2", [
        grpcclient.InferInput(n, [1, 3], "INT64").set_data_from_numpy(__import__("numpy").ones((1, 3), "int64"))
        for n in ("input_ids", "token_type_ids")])
    out["typed_gpt2"] = "served"
except Exception as exc:
    out["typed_gpt2"] = str(exc)
print(json.dumps(out))
"""


def test_open_inference_protocol_model_config_says_it_too(server: ServerThread) -> None:
    done = subprocess.run([sys.executable, "-c", TRITON_CONFIGS, server.target, server.http_url.removeprefix("http://"),
                           "tiny-llama", "tiny-gpt2", DEFAULT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    configs = json.loads(done.stdout)
    # Token types only where the model takes them; a caller sending them elsewhere is told which input.
    assert configs["tiny-gpt2"].pop("inputs") == configs["tiny-llama"].pop("inputs") == ["input_ids", "attention_mask",
                                                                                         "text"]
    assert configs[DEFAULT].pop("inputs") == ["input_ids", "attention_mask", "token_type_ids", "text"]
    typed = configs.pop("typed_gpt2")
    assert "INVALID_ARGUMENT" in typed and "input 'token_type_ids'" in typed and "unexpected input" in typed
    del configs["tiny-gpt2"]
    for parameters in configs["tiny-llama"].values():
        values = {k: v["string_value"] for k, v in parameters.items()}
        assert values["causal"] == "true" and values["num_key_value_heads"] == "2"
        assert values["kv_heads"] == "0,0,1,1" and values["position_embedding"] == "rotary"
        assert values["architecture"] == "LlamaModel" and "bos=1" in values["special_tokens"]
    for parameters in configs[DEFAULT].values():
        assert parameters["causal"]["string_value"] == "false"
        assert parameters["kv_heads"]["string_value"] == ",".join(str(h) for h in range(12))


def test_the_cli_shows_causal_and_grouped_query_heads(server: ServerThread, capsys: pytest.CaptureFixture[str]) \
        -> None:
    assert cli_main(["--target", server.target, "models"]) == 0
    out = capsys.readouterr().out
    llama = out[out.index("tiny-llama:"):].split("\n")
    assert llama[1].strip() == ("attention: causal (each token sees itself and earlier tokens), 2 key/value heads "
                                "(grouped-query: query heads 2 by 2 share one), rotary positions")
    assert "attention: bidirectional, 12 key/value heads (one per head), absolute positions" in out
    assert cli_main(["--target", server.target, "heads", "tiny-llama"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tiny-llama: 8 heads (2 layers x 4), 2 key/value heads per layer (causal)"
    assert lines[4].startswith("  layer  0 head  3 kv  1  ")


def test_pairs_of_a_causal_model_leave_out_the_first_tokens_forced_row(client: AttentionClient) -> None:
    text = "The cat sat on the mat."
    gpt2 = client.analyze(text, model="tiny-gpt2", top_k=3, word_level=True, attention=True, hidden_states=False)
    assert gpt2.attention is not None and np.all(gpt2.attention[:, :, 0, 0] == 1.0)  # only itself to attend to
    assert all(p.from_index != 0 for hp in [*gpt2.pairs, *gpt2.word_pairs] for p in hp.pairs)
    assert sum(len(hp.pairs) for hp in gpt2.pairs) == 3 * 8
    encoder = client.analyze(text, model="tiny-bert", top_k=40, attention=False, hidden_states=False)
    assert any(p.from_index == 0 for hp in encoder.pairs for p in hp.pairs)  # an encoder's [CLS] row counts
