"""The int8 variant (`attention-export --int8-from minilm-l6`): refused below the
top-5 agreement with float32 it is asked for; written on request
(`--int8-min-agreement 0`) next to the float32 model with its own checksum and its
fidelity on the probe corpus recorded, and served like any model."""

import json
import subprocess
import sys

import numpy as np
import pytest

from attention_client import AttentionClient
from attention_server.runtime.repository import sha256_file
from tests.helpers import MODEL_DIR, ServerThread, place_model_file


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """A repository holding a link to the exported float32 model."""
    repo = tmp_path_factory.mktemp("int8") / "repository"
    (repo / MODEL_DIR.name).mkdir(parents=True)
    for f in MODEL_DIR.iterdir():
        place_model_file(f, repo / MODEL_DIR.name / f.name)
    return repo


def export_int8(repository, *extra):
    return subprocess.run(
        [sys.executable, "-m", "attention_server.export", "--int8-from", MODEL_DIR.name,
         "--repository", str(repository), *extra], capture_output=True, text=True, timeout=280)


@pytest.mark.slow
def test_int8_is_refused_below_the_agreement_asked_for(repository):
    done = export_int8(repository, "--int8-min-agreement", "0.999")
    assert done.returncode != 0
    assert "int8 export refused: top-5 agreement with float32" in done.stderr
    assert not (repository / f"{MODEL_DIR.name}-int8").exists()


@pytest.mark.slow
def test_int8_model_records_its_fidelity_and_serves(repository):
    done = export_int8(repository, "--int8-min-agreement", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = repository / f"{MODEL_DIR.name}-int8"
    meta = json.loads((folder / "model.json").read_text())
    fp32 = json.loads((MODEL_DIR / "model.json").read_text())
    assert meta["name"] == folder.name and sha256_file(folder / "model.onnx") == meta["sha256"] != fp32["sha256"]
    assert meta["outputs"] == fp32["outputs"] and meta["inputs"] == fp32["inputs"]
    assert meta["quantization"]["quantized_matmuls"] == 5 * meta["num_layers"]
    v = meta["verification"]
    assert (v["probe_sentences"]["sequences"], v["probe_sentences_4_at_a_time"]["sequences"]) == (400, 100)
    for figures in (v["probe_sentences"], v["probe_sentences_4_at_a_time"]):
        assert 0 < figures["max_abs_diff_attention"] < 0.5  # int8 moves the numbers: not the float32 model
        assert 0.8 < figures["top5_agreement"] < 1
        per_head = np.array(figures["top5_agreement_per_head"])
        assert per_head.shape == (6, 12) and per_head.mean() == pytest.approx(figures["top5_agreement"], abs=1e-3)

    text = "The transformer model processes all tokens in parallel using multi-head attention."
    with ServerThread(model_repository=repository) as server, AttentionClient(server.target, timeout=60) as client:
        assert sorted(m.name for m in client.list_models()) == [MODEL_DIR.name, folder.name]
        full = client.analyze(text, model=MODEL_DIR.name, top_k=5)
        int8 = client.analyze(text, model=folder.name, top_k=5)
    assert [t.id for t in int8.tokens] == [t.id for t in full.tokens]
    np.testing.assert_allclose(int8.attention.sum(axis=-1), 1.0, atol=1e-5)  # still softmax rows
    assert np.abs(int8.attention - full.attention).max() < 0.5
    shared = [len({(p.from_index, p.to_index) for p in a.pairs} & {(p.from_index, p.to_index) for p in b.pairs})
              for a, b in zip(full.pairs, int8.pairs, strict=True)]
    assert sum(shared) / (5 * len(shared)) >= 0.8
