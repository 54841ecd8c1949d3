"""One ONNX Runtime session per model, and the padding of runtime batches."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

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


ArenaMode = Literal["keep", "shrink", "off"]
# With the arena in "shrink" mode, runs whose float32 attention output is larger than this give
# the arena's free chunks back afterwards; smaller runs keep them for reuse.
SHRINK_AFTER_BYTES = 16 << 20


def _session(path: Path, threads: int, memory_arena: ArenaMode) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # The arena keeps a run's buffers for the next run (faster), but never gives them back: ~280 MB
    # per session after one 512-token sequence. "shrink" returns them after large runs only.
    options.enable_cpu_mem_arena = memory_arena != "off"
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
                 instances: int = 1, memory_arena: ArenaMode = "shrink") -> None:
        self.session = _session(path, intra_op_threads, memory_arena)
        self.narrow = _session(path, 1, memory_arena) if instances > 1 else None
        self._shrink: ort.RunOptions | None = None
        if memory_arena == "shrink":
            self._shrink = ort.RunOptions()
            self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        # layers x heads of the attention output: what a run's memory grows with (batch x seq^2 x cells)
        shapes = {o.name: list(o.shape) for o in self.session.get_outputs()}
        self.output_shapes: dict[str, list[int | str | None]] = shapes
        """Each graph output's shape as the graph declares it (an int for a fixed dimension)."""
        dims = [d for d in shapes.get("attentions", [])[1:3] if isinstance(d, int)]
        self._cells = dims[0] * dims[1] if len(dims) == 2 else 1
        self.instances = max(1, instances)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if set(self.input_names) != set(inputs) or not set(outputs) <= set(self.output_names):
            raise ModelLoadError(f"{path}: graph inputs {self.input_names} / outputs {self.output_names} "
                                 f"do not match model.json ({inputs} / {outputs})")

    def run(self, feed: dict[str, np.ndarray], outputs: list[str], wide: bool = True,
            into: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run the graph; `feed` may hold more inputs than the graph takes. With `into`
        (an array of the exact shape and dtype for each of `outputs`), ONNX Runtime
        writes the outputs there (IOBinding) and they are returned as given: a
        caller's buffer, e.g. a response laid out before the run, and no copy."""
        session = self.session if wide or self.narrow is None else self.narrow
        ids = feed["input_ids"]
        large = ids.shape[0] * ids.shape[1] ** 2 * self._cells * 4 > SHRINK_AFTER_BYTES
        options = self._shrink if large else None
        if into is None:
            values = session.run(outputs, {name: feed[name] for name in self.input_names}, options)
            return dict(zip(outputs, values, strict=True))
        binding = session.io_binding()
        for name in self.input_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(feed[name]))
        for name in outputs:
            array = into[name]
            binding.bind_output(name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)
        session.run_with_iobinding(binding, options)
        return {name: into[name] for name in outputs}
