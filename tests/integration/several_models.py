"""A model repository for tests that serve several models in one server: the default
model (hard links, no copy of its 90 MB), tiny BERT, GPT-2 and Llama-style models from
the session's `tiny_repository`, and `tiny-bert-old`: tiny BERT with a model.json as
the exporter wrote it before per-layer outputs existed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tests.helpers import MODEL_DIR, place_model_file

TINY = ("tiny-bert", "tiny-gpt2", "tiny-llama")
OLD = "tiny-bert-old"
NEW_FIELDS = ("causal", "num_key_value_heads", "position_embedding", "hidden_states_outputs", "query_outputs",
              "key_outputs", "query_key_scaling", "word_start_prefix", "head_dim")


def build_repository(tiny_repository: Path, root: Path) -> Path:
    root.mkdir(parents=True)
    default = root / MODEL_DIR.name
    default.mkdir()
    for path in MODEL_DIR.iterdir():
        if path.is_file():
            place_model_file(path, default / path.name)
    for name in TINY:
        shutil.copytree(tiny_repository / name, root / name)
    old = root / OLD
    shutil.copytree(tiny_repository / "tiny-bert", old, ignore=shutil.ignore_patterns("roles.json"))
    raw = json.loads((old / "model.json").read_text())
    extra = set(raw.get("hidden_states_outputs", [])) | set(raw.get("query_outputs", [])) \
        | set(raw.get("key_outputs", []))
    raw = {k: v for k, v in raw.items() if k not in NEW_FIELDS}
    raw["name"] = OLD
    raw["outputs"] = [o for o in raw["outputs"] if o not in extra or o == "last_hidden_state"]
    (old / "model.json").write_text(json.dumps(raw, indent=2))
    return root


def model_json(repository: Path, name: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((repository / name / "model.json").read_text())
    return loaded


def run_onnx(repository: Path, name: str, ids: list[int], outputs: list[str]) -> dict[str, np.ndarray]:
    """One sequence alone (no padding) through the model's graph in this process."""
    meta = model_json(repository, name)
    session = ort.InferenceSession(str(repository / name / "model.onnx"), providers=["CPUExecutionProvider"])
    row = np.asarray([ids], dtype=np.int64)
    feed = {"input_ids": row, "attention_mask": np.ones_like(row), "token_type_ids": np.zeros_like(row)}
    inputs = meta["inputs"]
    assert isinstance(inputs, list)
    values = session.run(outputs, {k: feed[k] for k in inputs})
    return dict(zip(outputs, values, strict=True))
