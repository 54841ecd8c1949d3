"""The Open Inference Protocol on the attention.v1 port, driven by the real
tritonclient[grpc] from PyPI (in its own process, see triton/bert_client.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from attention_client import AttentionClient
from tests.helpers import MODEL_DIR, ROOT, ServerProcess, place_model_file

PROGRAM = ROOT / "tests" / "integration" / "triton" / "bert_client.py"


@pytest.fixture(scope="module")
def triton_run(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repository")
    (repo / "minilm-l6").mkdir()
    for path in MODEL_DIR.iterdir():
        place_model_file(path, repo / "minilm-l6" / path.name)
    second = repo / "second"
    second.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        place_model_file(MODEL_DIR / name, second / name)
    meta = json.loads((MODEL_DIR / "model.json").read_text())
    (second / "model.json").write_text(json.dumps({**meta, "name": "second"}))
    with ServerProcess("--model-repository", str(repo), "--models", '["minilm-l6"]',
                       "--model-control-mode", "explicit") as proc:
        done = subprocess.run([sys.executable, str(PROGRAM), "--url", proc.target, "--second", "second"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        with AttentionClient(proc.target, timeout=120) as client:
            yield json.loads(done.stdout), client


def test_health_and_metadata(triton_run):
    out, _ = triton_run
    assert out["live"] and out["ready"] and out["model_ready"] and not out["unknown_ready"]
    assert out["server"]["name"] == "attention-server"
    assert {"model_configuration", "statistics", "model_repository"} <= set(out["server"]["extensions"])
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in out["metadata"]["inputs"]}
    assert inputs["input_ids"] == ("INT64", ["-1", "-1"]) and inputs["text"][0] == "BYTES"
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in out["metadata"]["outputs"]}
    assert outputs["attentions"] == ("FP32", ["-1", "-1", "-1", "-1", "-1"])  # layers/heads parameters vary them
    assert outputs["last_hidden_state"] == ("FP32", ["-1", "-1", "384"])
    config = out["config"]
    assert config["max_batch_size"] == 64 and config["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in config["input"]][:3] == ["input_ids", "attention_mask", "token_type_ids"]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


def test_numpy_ids_give_our_own_apis_numbers(triton_run):
    out, client = triton_run
    hidden = np.array(out["ids"]["last_hidden_state"], dtype=np.float32)
    attention = np.array(out["ids"]["attentions"], dtype=np.float32)
    assert hidden.shape == (2, 8, 384) and attention.shape == (2, 6, 12, 8, 8)  # the caller's padded axis
    assert out["ids"]["sequence_length"] == [6, 4]
    assert out["ids_response_id"] == "ids-1"
    ours = client.analyze_batch([[101, 1996, 10938, 2121, 2944, 102], [101, 7592, 2088, 102]])
    for row, result in enumerate(ours):
        n = len(result.tokens)
        np.testing.assert_allclose(hidden[row, :n], result.hidden_states, atol=1e-5)
        np.testing.assert_allclose(attention[row, :, :, :n, :n], result.attention, atol=1e-6)
        assert not hidden[row, n:].any() and not attention[row, :, :, n:, :].any()


def test_text_input_tokens_float16_and_pairs(triton_run):
    out, client = triton_run
    text = out["text"]
    ours = client.analyze_batch(["The transformer model processes all tokens.", "hello world"], top_k=2,
                          attention_dtype="float16")
    assert text["sequence_length"] == [len(r.tokens) for r in ours]
    assert text["tokens"][1][:4] == ["[CLS]", "hello", "world", "[SEP]"] and text["tokens"][1][4] == ""
    assert text["attentions_fp16_dtype"] == "float16"
    att = np.array(text["attentions_fp16"])
    for row, result in enumerate(ours):
        n = len(result.tokens)
        np.testing.assert_array_equal(att[row, :, :, :n, :n], result.attention.astype(float))
        for hp in result.pairs:
            assert [p.from_index for p in hp.pairs] == text["pair_from_index"][row][hp.layer][hp.head]
            assert [p.to_index for p in hp.pairs] == text["pair_to_index"][row][hp.layer][hp.head]
            np.testing.assert_allclose([p.strength for p in hp.pairs], text["pair_strength"][row][hp.layer][hp.head])


def test_streaming_answers_every_request_and_reports_errors_in_band(triton_run):
    out, _ = triton_run
    assert sorted(out["stream"]) == ["stream-0", "stream-1", "stream-2"]
    first = np.array(out["stream"]["stream-0"])
    np.testing.assert_allclose(first, np.array(out["ids"]["last_hidden_state"]), atol=1e-5)
    assert len(out["stream_errors"]) == 1 and "input_ids" in out["stream_errors"][0]


def test_errors_follow_the_protocol(triton_run):
    errors = triton_run[0]["errors"]
    assert errors["wrong_datatype"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "input 'input_ids'" in errors["wrong_datatype"]["message"]
    assert errors["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert errors["unknown_output"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "output 'logits'" in errors["unknown_output"]["message"]


def test_statistics_move_with_the_calls(triton_run):
    before, after = triton_run[0]["stats_before"], triton_run[0]["stats_after"]
    # 1 ids call (2 rows) + 1 text call (2 rows) + 3 streamed calls (2 rows each) succeeded
    assert int(after.get("inference_count", 0)) - int(before.get("inference_count", 0)) == 10
    assert int(after["inference_stats"]["success"]["count"]) - int(
        before["inference_stats"].get("success", {}).get("count", 0)) == 5
    assert int(after["execution_count"]) >= int(before.get("execution_count", 0)) + 1
    assert int(after["inference_stats"]["compute_infer"]["ns"]) > 0
    assert after["batch_stats"] and all(int(b["batch_size"]) >= 1 for b in after["batch_stats"])


def test_load_and_unload_a_second_model(triton_run):
    out, _ = triton_run
    assert not out["second_ready_before"] and out["second_ready_loaded"] and not out["second_ready_unloaded"]
    assert {"name": "second", "state": "UNAVAILABLE", "reason": "unloaded"} in out["index_before"]
    np.testing.assert_allclose(np.array(out["second_hidden"]), np.array(out["ids"]["last_hidden_state"]), atol=1e-5)
    assert {m["name"]: m["state"] for m in out["index_after"]} == {"minilm-l6": "READY", "second": "UNAVAILABLE"}


def test_our_inference_protos_match_tritonclients_field_numbers():
    """Wire compatibility: every field we define has tritonclient's number and type."""
    script = ("import json; from tritonclient.grpc import service_pb2, model_config_pb2; "
              "from tests.integration.triton.descriptors import field_table; "
              "print(json.dumps(field_table(service_pb2, model_config_pb2)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    theirs = json.loads(done.stdout)
    from attention_server._proto.inference import grpc_service_pb2, model_config_pb2
    from tests.integration.triton.descriptors import field_table

    ours = field_table(grpc_service_pb2, model_config_pb2)
    checked = 0
    for message, our_fields in ours.items():
        if message.endswith("Entry"):
            continue
        assert message in theirs, f"{message} is not a Triton message"
        for name, spec in our_fields.items():
            triton = theirs[message].get(name)
            assert triton == spec, f"{message}.{name}: ours {spec}, Triton {triton}"
            checked += 1
    assert checked > 100
