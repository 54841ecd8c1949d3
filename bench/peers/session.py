"""The ONNX Runtime session both peer runtimes use: the service's own model file,
as many intra-op threads as this process may use cores (what an operator of
either server would set), and only the outputs the Open Inference Protocol
clients ask for: the hidden states and the float32 attention."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

OUTPUTS = ("last_hidden_state", "attentions")


class AttentionSession:
    """`model.onnx` in ONNX Runtime; `run` takes INT64 input_ids and attention_mask
    ([batch, seq]) and returns the OUTPUTS by name."""

    def __init__(self, path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": input_ids.astype(np.int64, copy=False),
                 "attention_mask": attention_mask.astype(np.int64, copy=False)}
        if "token_type_ids" in self.inputs:  # one segment, as the service's own default
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        return dict(zip(OUTPUTS, self.session.run(list(OUTPUTS), feeds), strict=True))
