"""The Open Inference Protocol on both ports, driven by the real clients from
PyPI, each in its own process: triton/bert_client.py with tritonclient.grpc
(gRPC port) and with tritonclient.http (HTTP port), and triton/kserve_client.py
with KServe's REST client. One server for the module; the programs run one
after another, so each one's statistics move by its own calls only. Numbers
over HTTP must equal the gRPC path's exactly."""

import json
import subprocess
import sys

import numpy as np
import pytest

from attention_client import AttentionClient
from tests.helpers import MODEL_DIR, ROOT, ServerThread, place_model_file

PROGRAMS = ROOT / "tests" / "integration" / "triton"
PROTOCOLS = ("grpc", "http")
# What each transport answers for the same failure.
STATUS = {
    "grpc": {"invalid": "StatusCode.INVALID_ARGUMENT", "not_found": "StatusCode.NOT_FOUND",
             "precondition": "StatusCode.FAILED_PRECONDITION"},
    "http": {"invalid": "400", "not_found": "404", "precondition": "400"},
}


def _run(program: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(PROGRAMS / program), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"grpc": ..., "http": ..., "kserve": ...}: what each program saw, and a client of our own API."""
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
    with ServerThread(model_repository=repo, models=["minilm-l6"], model_control_mode="explicit") as srv:
        http = srv.http_url.removeprefix("http://")
        out = {
            "grpc": _run("bert_client.py", "--url", srv.target, "--protocol", "grpc", "--second", "second"),
            "http": _run("bert_client.py", "--url", http, "--protocol", "http", "--second", "second"),
            "kserve": _run("kserve_client.py", "--url", srv.http_url),
        }
        with AttentionClient(srv.target, timeout=120) as client:
            yield out, client


@pytest.fixture(params=PROTOCOLS)
def triton_run(request, runs):
    out, client = runs
    return request.param, out[request.param], client


def test_health_and_metadata(triton_run):
    _, out, _ = triton_run
    assert out["live"] and out["ready"] and out["model_ready"] and not out["unknown_ready"]
    assert out["server"]["name"] == "attention-server"
    assert {"model_configuration", "statistics", "model_repository"} <= set(out["server"]["extensions"])
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in out["metadata"]["inputs"]}
    assert inputs["input_ids"] == ("INT64", [-1, -1]) and inputs["text"][0] == "BYTES"
    outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in out["metadata"]["outputs"]}
    assert outputs["attentions"] == ("FP32", [-1, -1, -1, -1, -1])  # layers/heads parameters vary them
    assert outputs["last_hidden_state"] == ("FP32", [-1, -1, 384])
    config = out["config"]
    assert int(config["max_batch_size"]) == 64 and config["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in config["input"]][:3] == ["input_ids", "attention_mask", "token_type_ids"]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


def test_metadata_is_the_same_document_on_both_ports(runs):
    grpc, http = runs[0]["grpc"], runs[0]["http"]
    assert http["server"] == grpc["server"]

    assert _numbers(http["metadata"]) == _numbers(grpc["metadata"])
    # The REST config also carries fields at their defaults (as Triton's does): every field gRPC has is equal.
    assert _subset(_numbers(grpc["config"]), _numbers(http["config"]))  # parameters are strings, "6" too


def _numbers(doc):
    """tritonclient.grpc's JSON quotes 64-bit integers; the REST API's are numbers."""
    if isinstance(doc, dict):
        return {k: _numbers(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_numbers(v) for v in doc]
    if isinstance(doc, str) and doc.lstrip("-").isdigit():
        return int(doc)
    return doc


def _subset(small, big) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(_subset, small, big))
    return small == big


def test_numpy_ids_give_our_own_apis_numbers(triton_run):
    _, out, client = triton_run
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


def test_text_input_tokens_float16_and_pairs_of_the_heads_asked_for(triton_run):
    _, out, client = triton_run
    text = out["text"]
    layers, heads = [0, 5], [2, 3]
    ours = client.analyze_batch(["The transformer model processes all tokens.", "hello world"], top_k=2,
                                layers=layers, heads=heads, attention_dtype="float16")
    assert text["sequence_length"] == [len(r.tokens) for r in ours]
    assert text["tokens"][1][:4] == ["[CLS]", "hello", "world", "[SEP]"] and text["tokens"][1][4] == ""
    assert text["attentions_fp16_dtype"] == "float16"
    att = np.array(text["attentions_fp16"])
    assert att.shape[1:3] == (2, 2)
    for row, result in enumerate(ours):
        n = len(result.tokens)
        np.testing.assert_array_equal(att[row, :, :, :n, :n], result.attention.astype(float))
        for hp in result.pairs:
            at = (row, layers.index(hp.layer), heads.index(hp.head))
            assert [p.from_index for p in hp.pairs] == text["pair_from_index"][at[0]][at[1]][at[2]]
            assert [p.to_index for p in hp.pairs] == text["pair_to_index"][at[0]][at[1]][at[2]]
            np.testing.assert_allclose([p.strength for p in hp.pairs], text["pair_strength"][at[0]][at[1]][at[2]])


@pytest.mark.parametrize("client", ["http", "kserve"])
def test_numbers_over_http_equal_the_grpc_paths_exactly(runs, client):
    grpc, other = runs[0]["grpc"], runs[0][client]
    assert other["ids"] == grpc["ids"]
    assert other["text"] == grpc["text"]
    assert {k: other["json"][k] for k in grpc["ids"]} == grpc["ids"]  # tensors as JSON both ways
    assert other["ids_response_id"] == "ids-1"
    if client == "http":
        assert other["json"]["tokens"][1][:4] == ["[CLS]", "hello", "world", "[SEP]"]
        assert other["gzip"] == other["deflate"] == grpc["ids"]["last_hidden_state"]  # compressed bodies


def test_grpc_streaming_answers_every_request_and_reports_errors_in_band(runs):
    out = runs[0]["grpc"]
    assert sorted(out["stream"]) == ["stream-0", "stream-1", "stream-2"]
    first = np.array(out["stream"]["stream-0"])
    np.testing.assert_allclose(first, np.array(out["ids"]["last_hidden_state"]), atol=1e-5)
    assert len(out["stream_errors"]) == 1 and "input_ids" in out["stream_errors"][0]


@pytest.mark.parametrize("protocol", [*PROTOCOLS, "kserve"])
def test_errors_follow_the_protocol(runs, protocol):
    errors = runs[0][protocol]["errors"]
    status = STATUS["grpc" if protocol == "grpc" else "http"]
    assert errors["wrong_datatype"]["status"] == status["invalid"]
    assert "input 'input_ids'" in errors["wrong_datatype"]["message"]
    assert errors["unknown_model"]["status"] == status["not_found"]
    assert "no-such-model" in errors["unknown_model"]["message"]
    assert errors["unknown_output"]["status"] == status["invalid"]
    assert "output 'logits'" in errors["unknown_output"]["message"]
    if protocol == "kserve":
        return
    assert errors["bad_parameter"]["status"] == status["invalid"]
    assert "parameter 'top_k'" in errors["bad_parameter"]["message"]
    assert errors["too_many_rows"]["status"] == status["invalid"] and "1 to 64" in errors["too_many_rows"]["message"]
    assert errors["unknown_model_metadata"]["status"] == status["not_found"]
    assert errors["load_unknown"]["status"] in (status["not_found"], status["precondition"])
    assert "no-such-model" in errors["load_unknown"]["message"]
    other = runs[0]["http" if protocol == "grpc" else "grpc"]["errors"]
    assert {k: e["message"] for k, e in errors.items()} == {k: e["message"] for k, e in other.items()}


def test_statistics_move_by_exactly_the_calls_made(triton_run):
    _, out, _ = triton_run
    before, after = out["stats_before"], out["stats_after"]

    def count(stats, *path):
        for key in path:
            stats = stats.get(key, {})
        return int(stats or 0)

    # gRPC: 1 ids call (2 rows) + 1 text call (2 rows) + 3 streamed calls (2 rows each) succeeded;
    # HTTP: the same two, and 3 more of 2 rows (JSON tensors, gzip, deflate). Refused calls count nowhere.
    assert count(after, "inference_count") - count(before, "inference_count") == 10
    assert count(after, "inference_stats", "success", "count") - count(before, "inference_stats", "success",
                                                                       "count") == 5
    assert count(after, "inference_stats", "fail", "count") == count(before, "inference_stats", "fail", "count")
    assert count(after, "execution_count") >= count(before, "execution_count") + 1
    assert count(after, "inference_stats", "compute_infer", "ns") > 0
    assert after["batch_stats"] and all(int(b["batch_size"]) >= 1 for b in after["batch_stats"])


def test_rest_statistics_carry_every_count_zeros_included(runs):
    stats = runs[0]["http"]["stats_after"]
    for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        assert set(stats["inference_stats"][name]) == {"count", "ns"}
        assert all(isinstance(v, int) for v in stats["inference_stats"][name].values())
    assert isinstance(stats["inference_count"], int) and isinstance(stats["last_inference"], int)


def test_load_and_unload_a_second_model(triton_run):
    _, out, _ = triton_run
    assert not out["second_ready_before"] and out["second_ready_loaded"] and not out["second_ready_unloaded"]
    assert {"name": "second", "state": "UNAVAILABLE", "reason": "unloaded"} in out["index_before"]
    np.testing.assert_allclose(np.array(out["second_hidden"]), np.array(out["ids"]["last_hidden_state"]), atol=1e-5)
    assert {m["name"]: m["state"] for m in out["index_after"]} == {"minilm-l6": "READY", "second": "UNAVAILABLE"}


def test_kserve_health(runs):
    out = runs[0]["kserve"]
    assert out["live"] and out["ready"] and out["model_ready"] and not out["unknown_ready"]


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
