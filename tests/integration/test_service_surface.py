"""Health, reflection, model metadata, the asyncio client and the CLI."""

import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from attention_client import AsyncAttentionClient, DeadlineExceededError, InvalidArgumentError

SENTENCE = "The transformer model processes all tokens in parallel using multi-head attention."


def test_standard_health_check_reports_serving(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "attention.v1.AttentionService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_api(server):
    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"attention.v1.AttentionService", "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("attention.v1.AttentionService")
        methods = {m.name for m in desc.service[0].method}
        assert methods == {"Analyze", "AnalyzeStream", "ListModels", "GetModel"}
        assert "inference.GRPCInferenceService" in services
        kserve = db.FindFileContainingSymbol("inference.GRPCInferenceService")
        assert {"ModelInfer", "ModelStreamInfer", "ModelConfig"} <= {m.name for m in kserve.service[0].method}


def test_model_metadata_and_heads(client):
    [info] = client.list_models()
    assert info == client.get_model("minilm-l6") == client.get_model()
    assert (info.num_layers, info.num_heads, info.hidden_size, info.max_positions, info.vocab_size) == (
        6, 12, 384, 512, 30522)
    assert info.special_tokens["cls"] == ("[CLS]", 101) and info.special_tokens["sep"] == ("[SEP]", 102)
    assert [(h.layer, h.index) for h in info.heads] == [(layer, h) for layer in range(6) for h in range(12)]
    assert len(info.sha256) == 64 and info.max_batch_size == 64
    assert "all-MiniLM-L6-v2" in info.source
    assert info.input_names[:2] == ["input_ids", "attention_mask"]


async def test_async_client_matches_sync_client(server, client):
    sync = client.analyze_batch([SENTENCE, "hi"], top_k=2)
    async with AsyncAttentionClient(server.target, timeout=60, metadata=[("x-test", "1")]) as aclient:
        results = await aclient.analyze_batch([SENTENCE, "hi"], top_k=2)
        streamed = [r async for r in aclient.analyze_stream([SENTENCE, "hi"], top_k=2)]
        one = await aclient.analyze(SENTENCE, top_k=2)
        info = await aclient.get_model()
        with pytest.raises(InvalidArgumentError) as err:
            await aclient.analyze("x", layers=[9])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.request_id
    np.testing.assert_allclose(one.attention, sync[0].attention, atol=1e-6)
    assert info.name == "minilm-l6"
    for a, b, c in zip(sync, results, streamed, strict=True):
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-6)
        np.testing.assert_allclose(a.attention, c.attention, atol=1e-6)
        assert a.pairs == b.pairs == c.pairs


def test_deadline_is_reported_as_deadline_exceeded(client):
    with pytest.raises(DeadlineExceededError) as err:
        client.analyze_batch(["word " * 200] * 4, timeout=0.001)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and not err.value.retryable


def _cli(server, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "attention_client.cli", "--target", server.target, *args],
                          capture_output=True, text=True, timeout=120, input=stdin)


def test_cli_prints_the_pair_table(server, client):
    done = _cli(server, "analyze", SENTENCE, "--top-k", "2", "--layers", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["layer", "head", "role", "from", "to", "strength"]
    rows = [line.split() for line in lines[1:] if line and line[0] == " "]
    assert len(rows) == 12 * 2 and {r[0] for r in rows} == {"2"}
    expected = client.analyze(SENTENCE, top_k=2, layers=[2], exclude_special_tokens=True)
    roles = {(h.layer, h.index): h.role for h in client.get_model().heads}
    first = expected.pair_rows()[0]
    assert rows[0] == [str(first[0]), str(first[1]), roles[(first[0], first[1])], first[2], first[3],
                       f"{first[4] * 100:.1f}%"]
    assert "[CLS]" not in done.stdout.split("(pairs")[0]


def test_cli_dumps_json_and_npz(server, tmp_path):
    done = _cli(server, "analyze", "hello world", "--include-special", "--top-k", "1",
                "--json", str(tmp_path / "r.json"), "--npz", str(tmp_path / "r.npz"))
    assert done.returncode == 0, done.stderr
    [result] = json.loads((tmp_path / "r.json").read_text())
    assert [t["text"] for t in result["tokens"]] == ["[CLS]", "hello", "world", "[SEP]"]
    assert np.asarray(result["attention"]).shape == (6, 12, 4, 4)
    with np.load(tmp_path / "r.npz") as npz:
        assert npz["seq0_attention"].shape == (6, 12, 4, 4) and npz["seq0_hidden_states"].shape == (4, 384)
        np.testing.assert_allclose(npz["seq0_attention"], np.asarray(result["attention"]), atol=1e-7)


def test_cli_reports_errors_with_the_status(server):
    done = _cli(server, "analyze", "x", "--layers", "99")
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr and "options.layers[0]" in done.stderr
    models = _cli(server, "models")
    assert models.returncode == 0 and "minilm-l6: BertModel, 6 layers x 12 heads" in models.stdout
    heads = _cli(server, "heads")
    assert heads.returncode == 0 and "72 heads" in heads.stdout


def test_cli_reads_stdin_and_writes_json_to_stdout(server, client):
    texts = [SENTENCE, "hello world", "Short."]
    done = _cli(server, "analyze", "-", "--top-k", "1", "--json", "-", stdin="\n".join(texts) + "\n\n")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)  # JSON only on stdout
    assert [r["text"] for r in results] == texts and [r["index"] for r in results] == [0, 1, 2]
    expected = client.analyze_batch(texts, top_k=1)
    for got, want in zip(results, expected, strict=True):
        assert [t["text"] for t in got["tokens"]] == want.token_texts
        np.testing.assert_allclose(np.asarray(got["attention"]), want.attention, atol=1e-7)


def test_cli_splits_a_file_into_the_servers_batches_and_streams(tmp_path):
    from tests.helpers import ServerThread

    lines = [{"text": f"sentence number {k} is here.", "id": f"s{k}"} for k in range(5)]
    lines[1]["text_pair"] = "And a second segment."
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with ServerThread(max_batch_size=2) as small:
        for mode in ([], ["--stream"]):
            done = _cli(small, "analyze", "--input", str(source), "--top-k", "1", "--json", str(tmp_path / "r.json"),
                        "--progress", *mode)
            assert done.returncode == 0, done.stderr  # 5 texts, at most 2 per request
            results = json.loads((tmp_path / "r.json").read_text())
            assert [r["id"] for r in results] == [f"s{k}" for k in range(5)]
            assert {t["segment"] for t in results[1]["tokens"]} == {0, 1}
            assert "5/5" in done.stderr  # the progress bar
            assert done.stdout.count("# [s") == 5


def test_cli_writes_a_head_view_per_text_and_a_page_to_pick(server, tmp_path):
    page = tmp_path / "views.html"
    done = _cli(server, "analyze", SENTENCE, "hello world", "--html", str(page), "--layers", "0")
    assert done.returncode == 0, done.stderr
    picker = page.read_text()
    for k in range(2):
        view = tmp_path / f"views-{k}.html"
        assert f'href="{view.name}"' in picker and '"layers": [0]' in view.read_text()
