"""One ONNX Runtime session per model, and the padding of runtime batches."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import ModelLoadError
from .types import Tokens

log = logging.getLogger(__name__)


def pad_batch(sequences: list[Tokens], pad_id: int) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and token_type_ids [batch, longest], right-padded."""
    length = max(len(s) for s in sequences)
    ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    types = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        n = len(seq)
        ids[row, :n] = seq.ids
        mask[row, :n] = 1
        types[row, :n] = seq.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime's errors (InvalidProtobuf, Fail, ...) derive from Exception only
        reason = str(exc).replace(str(path), "the file")
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it ({reason}); re-export the model (make model), "
                             "or keep --verify-checksums on to catch a damaged file") from exc


class OnnxModel:
    """A loaded ONNX graph with outputs last_hidden_state [b, s, hidden] and
    attentions [b, layers, heads, s, s].

    Two sessions over the same graph: a wide one (intra_op_threads, default every
    core) for a lone batch on an idle server, and, when instances > 1, a
    single-threaded one that `instances` batches run on side by side under load.
    """

    def __init__(self, path: Path, inputs: list[str], outputs: list[str], intra_op_threads: int = 0,
                 instances: int = 1) -> None:
        self.session = _session(path, intra_op_threads)
        self.narrow = _session(path, 1) if instances > 1 else None
        self.instances = max(1, instances)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if set(self.input_names) != set(inputs) or not set(outputs) <= set(self.output_names):
            raise ModelLoadError(f"{path}: graph inputs {self.input_names} / outputs {self.output_names} "
                                 f"do not match model.json ({inputs} / {outputs})")

    def run(self, feed: dict[str, np.ndarray], outputs: list[str], wide: bool = True) -> dict[str, np.ndarray]:
        """Run the graph; `feed` may hold more inputs than the graph takes."""
        session = self.session if wide or self.narrow is None else self.narrow
        values = session.run(outputs, {name: feed[name] for name in self.input_names})
        return dict(zip(outputs, values, strict=True))
