"""Triton's system shared-memory extension as a tritonclient program uses it, with
`tritonclient.utils.shared_memory` and tritonclient.grpc or tritonclient.http
unchanged (only the address names this server). Runs in its own process (see
bert_client.py) and prints one JSON document with what it saw.

    shm_client.py --url HOST:PORT --protocol grpc|http --scenario NAME [--prefix P]

Scenarios: `roundtrip` (inputs from and outputs into regions, compared with the
same call over the wire, byte for byte), `hostile` (each wrong use: the status
and message), `unregister` (unregister and register again while other threads
infer through the region), `truncated` (the owner shrinks its object under a
registered region), `limits` (register until the server's limits refuse),
`leave` (register and exit without unregistering: the server keeps the regions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

import numpy as np
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, serialized_byte_size, triton_to_np_dtype

MODEL = "minilm-l6"
IDS = np.array([[101, 1996, 10938, 2121, 2944, 102, 0, 0],
                [101, 7592, 2088, 102, 0, 0, 0, 0]], dtype=np.int64)
MASK = (IDS != 0).astype(np.int64)
ATTENTION = IDS.shape[0] * 6 * 12 * IDS.shape[1] ** 2 * 4
HIDDEN = IDS.shape[0] * IDS.shape[1] * 384 * 4
OUTPUTS = {"attentions": ATTENTION, "last_hidden_state": HIDDEN, "sequence_length": 16, "tokens": 1024}


def _error(fn: Any) -> dict[str, Any]:
    try:
        fn()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    return {"status": None, "message": None}


class Program:
    def __init__(self, protocol: str, url: str, prefix: str) -> None:
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc  # type: ignore[no-redef]
        self.tc = tc
        self.protocol = protocol
        self.url = url
        self.client = tc.InferenceServerClient(url)
        self.prefix = prefix
        self.handles: list[Any] = []

    def region(self, name: str, size: int, register: bool = True) -> Any:
        key = f"/{self.prefix}_{name}"
        handle = shm.create_shared_memory_region(name, key, size)
        self.handles.append(handle)
        if register:
            self.client.register_system_shared_memory(name, key, size)
        return handle

    def key(self, name: str) -> str:
        return f"/{self.prefix}_{name}"

    def status(self) -> dict[str, dict[str, Any]]:
        """{name: {key, offset, byte_size}} of the registered regions, as either client returns them."""
        raw = self.client.get_system_shared_memory_status()
        if self.protocol == "grpc":
            return {n: {"key": r.key, "offset": r.offset, "byte_size": r.byte_size} for n, r in raw.regions.items()}
        return {r["name"]: {"key": r["key"], "offset": r["offset"], "byte_size": r["byte_size"]} for r in raw}

    def ids_inputs(self, region: str, offset: int = 0) -> list[Any]:
        inputs = [self.tc.InferInput(n, list(IDS.shape), "INT64") for n in ("input_ids", "attention_mask")]
        inputs[0].set_shared_memory(region, IDS.nbytes, offset=offset)
        inputs[1].set_shared_memory(region, MASK.nbytes, offset=offset + IDS.nbytes)
        return inputs

    def wire_inputs(self) -> list[Any]:
        inputs = [self.tc.InferInput(n, list(IDS.shape), "INT64") for n in ("input_ids", "attention_mask")]
        inputs[0].set_data_from_numpy(IDS)
        inputs[1].set_data_from_numpy(MASK)
        return inputs

    def shm_outputs(self, region: str, sizes: dict[str, int], start: int = 0) -> tuple[list[Any], dict[str, int]]:
        outputs, offsets, offset = [], {}, start
        for name, size in sizes.items():
            out = self.tc.InferRequestedOutput(name)
            out.set_shared_memory(region, size, offset=offset)
            outputs.append(out)
            offsets[name] = offset
            offset += size
        return outputs, offsets

    def meta(self, result: Any, name: str) -> tuple[str, list[int], dict[str, Any]]:
        out = result.get_output(name)
        if self.protocol == "grpc":
            params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in out.parameters.items()}
            return out.datatype, list(out.shape), params
        return out["datatype"], out["shape"], out.get("parameters", {})

    def read(self, handle: Any, datatype: str, shape: list[int], offset: int) -> np.ndarray:
        dtype = np.object_ if datatype == "BYTES" else triton_to_np_dtype(datatype)
        return shm.get_contents_as_numpy(handle, dtype, shape, offset=offset)

    def close(self, unregister: bool = True) -> None:
        if unregister:
            self.client.unregister_system_shared_memory()
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)
        self.client.close()

    # -- scenarios ---------------------------------------------------------------------

    def roundtrip(self) -> dict[str, Any]:
        out: dict[str, Any] = {"extensions": list(self._extensions())}
        inp = self.region("in", 64 + 2 * IDS.nbytes)
        shm.set_shared_memory_region(inp, [IDS, MASK], offset=64)
        outh = self.region("out", 128 + sum(OUTPUTS.values()))
        out["status"] = self.status()
        outputs, offsets = self.shm_outputs("out", OUTPUTS, start=128)
        result = self.client.infer(MODEL, self.ids_inputs("in", 64), outputs=outputs)
        wire = self.client.infer(MODEL, self.wire_inputs(), outputs=[self.tc.InferRequestedOutput(n) for n in OUTPUTS])
        out["outputs"] = {}
        for name in OUTPUTS:
            datatype, shape, params = self.meta(result, name)
            got = self.read(outh, datatype, shape, offsets[name])
            expected = wire.as_numpy(name)
            out["outputs"][name] = {"datatype": datatype, "shape": shape, "parameters": params,
                                    "equal": bool(np.array_equal(got, expected)),
                                    "raw_is_little_endian_row_major": bool(
                                        datatype == "BYTES" or bytes(outh._mpsm_handle.buf[
                                            offsets[name]:offsets[name] + expected.nbytes]) ==
                                        np.ascontiguousarray(expected).astype(expected.dtype.newbyteorder("<"))
                                        .tobytes())}
        # The pair outputs (top_k), sized from the request before the model runs.
        pairs = {"pair_from_index": 2 * 6 * 12 * 3 * 4, "pair_strength": 2 * 6 * 12 * 3 * 4}
        outputs, offsets = self.shm_outputs("out", pairs, start=128)
        paired = self.client.infer(MODEL, self.ids_inputs("in", 64), outputs=outputs, parameters={"top_k": 3})
        wire_pairs = self.client.infer(MODEL, self.wire_inputs(), outputs=[self.tc.InferRequestedOutput(n)
                                                                           for n in pairs], parameters={"top_k": 3})
        out["pairs_equal"] = {name: bool(np.array_equal(self.read(outh, *self.meta(paired, name)[:2], offsets[name]),
                                                        wire_pairs.as_numpy(name))) for name in pairs}
        if self.protocol == "grpc":  # one (empty) raw entry per output, as Triton
            response = result.get_response()
            out["raw_output_contents"] = [len(r) for r in response.raw_output_contents]
            out["stream_equal"] = self._stream(outh, wire)
        # Text in through shared memory, one output over the wire and one into the region.
        texts = np.array([b"The cat sat on the mat.", b"Where is it?"], dtype=object)
        serialized = serialize_byte_tensor(texts)
        text_region = self.region("text", serialized_byte_size(serialized))
        shm.set_shared_memory_region(text_region, [serialized])
        text = self.tc.InferInput("text", [2], "BYTES")
        text.set_shared_memory("text", serialized_byte_size(serialized))
        tokens = self.tc.InferRequestedOutput("tokens")
        tokens.set_shared_memory("out", 1024)
        length = self.tc.InferRequestedOutput("sequence_length")
        result = self.client.infer(MODEL, [text], outputs=[tokens, length])
        datatype, shape, _ = self.meta(result, "tokens")
        out["text"] = {"tokens": [[t.decode() for t in row] for row in self.read(outh, datatype, shape, 0)],
                       "sequence_length": result.as_numpy("sequence_length").tolist()}
        self.client.unregister_system_shared_memory("text")
        out["status_after_unregister"] = sorted(self.status())
        self.close()
        out["status_after_unregister_all"] = sorted(self.status() if self._reopen() else {})
        return out

    def _stream(self, handle: Any, wire: Any) -> bool:
        """The same call through the streaming client: its attentions land in the region too."""
        import queue

        answers: queue.Queue[Any] = queue.Queue()
        handle._mpsm_handle.buf[:ATTENTION] = bytes(ATTENTION)  # cleared: what is read next is the stream's
        outputs, _ = self.shm_outputs("out", {"attentions": ATTENTION})
        self.client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            self.client.async_stream_infer(MODEL, self.ids_inputs("in", 64), outputs=outputs)
            result, error = answers.get(timeout=60)
        finally:
            self.client.stop_stream()
        if error is not None:
            return False
        datatype, shape, _ = self.meta(result, "attentions")
        return bool(np.array_equal(self.read(handle, datatype, shape, 0), wire.as_numpy("attentions")))

    def _reopen(self) -> bool:
        self.client = self.tc.InferenceServerClient(self.url)
        return True

    def _extensions(self) -> list[str]:
        meta = self.client.get_server_metadata()
        return list(meta.extensions) if self.protocol == "grpc" else meta["extensions"]

    def hostile(self) -> dict[str, Any]:
        inp = self.region("in", 2 * IDS.nbytes)
        shm.set_shared_memory_region(inp, [IDS, MASK])
        self.region("small", 1024)
        self.region("big", ATTENTION)
        key = self.key("in")
        cases: dict[str, Any] = {
            "register twice": lambda: self.client.register_system_shared_memory("in", key, 2 * IDS.nbytes),
            "key traversal": lambda: self.client.register_system_shared_memory("x", "/../../etc/passwd", 16),
            "key with a slash": lambda: self.client.register_system_shared_memory("x", "a/b", 16),
            "key dot-dot": lambda: self.client.register_system_shared_memory("x", "..", 16),
            "key missing": lambda: self.client.register_system_shared_memory("x", f"/{self.prefix}_nope", 16),
            "region past the object": lambda: self.client.register_system_shared_memory("x", key, 1 << 20),
            "offset past the object": lambda: self.client.register_system_shared_memory("x", key, 16, offset=1 << 20),
            "byte size zero": lambda: self.client.register_system_shared_memory("x", key, 0),
            "status unknown": lambda: self.client.get_system_shared_memory_status("nope"),
        }
        out = {name: _error(fn) for name, fn in cases.items()}
        out["unregister unknown"] = _error(lambda: self.client.unregister_system_shared_memory("nope"))
        wire_out = [self.tc.InferRequestedOutput("sequence_length")]

        def infer(inputs: list[Any], outputs: list[Any] | None = None) -> Any:
            return self.client.infer(MODEL, inputs, outputs=outputs or wire_out)

        unknown = self.ids_inputs("in")
        unknown[0].set_shared_memory("nope", IDS.nbytes)
        out["infer unknown region"] = _error(lambda: infer(unknown))
        beyond = self.ids_inputs("in")
        beyond[1].set_shared_memory("in", IDS.nbytes, offset=IDS.nbytes + 8)
        out["infer offset+size beyond region"] = _error(lambda: infer(beyond))
        wrong = self.ids_inputs("in")
        wrong[0].set_shared_memory("in", IDS.nbytes - 8)
        out["infer byte size not the tensor's"] = _error(lambda: infer(wrong))
        small, _ = self.shm_outputs("small", {"attentions": 1024})
        out["output region smaller than the output"] = _error(lambda: infer(self.ids_inputs("in"), small))
        short, _ = self.shm_outputs("big", {"attentions": ATTENTION - 4})
        out["output byte size smaller than the output"] = _error(lambda: infer(self.ids_inputs("in"), short))
        tokens, _ = self.shm_outputs("small", {"tokens": 8})
        out["bytes output larger than its byte size"] = _error(lambda: infer(self.ids_inputs("in"), tokens))
        past, _ = self.shm_outputs("small", {"sequence_length": 16})
        past[0].set_shared_memory("small", 16, offset=1020)
        out["output offset+size beyond region"] = _error(lambda: infer(self.ids_inputs("in"), past))
        out["still serves"] = infer(self.wire_inputs()).as_numpy("sequence_length").tolist()
        self.close()
        return out

    def unregister(self) -> dict[str, Any]:
        """Threads infer through a region while the main thread unregisters and registers it again."""
        inp = self.region("in", 2 * IDS.nbytes)
        shm.set_shared_memory_region(inp, [IDS, MASK])
        outh = self.region("out", ATTENTION)
        stop = threading.Event()
        seen: dict[str, int] = {}
        wrong: list[str] = []
        lock = threading.Lock()
        expected = self.client.infer(MODEL, self.wire_inputs()).as_numpy("attentions")

        def worker() -> None:
            client = self.tc.InferenceServerClient(self.url)
            outputs, _ = self.shm_outputs("out", {"attentions": ATTENTION})
            inputs = self.ids_inputs("in")
            while not stop.is_set():
                try:
                    client.infer(MODEL, inputs, outputs=outputs)
                    key = "ok"
                except InferenceServerException as exc:
                    key = f"{exc.status()}: {exc.message()[:60]}"
                with lock:
                    seen[key] = seen.get(key, 0) + 1
            client.close()

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        cycles = 0
        while sum(seen.values()) < 60 and cycles < 2000:
            self.client.unregister_system_shared_memory("out")
            self.client.unregister_system_shared_memory("in")
            self.client.register_system_shared_memory("in", self.key("in"), 2 * IDS.nbytes)
            self.client.register_system_shared_memory("out", self.key("out"), ATTENTION)
            cycles += 1
        stop.set()
        for t in threads:
            t.join()
        outputs, _ = self.shm_outputs("out", {"attentions": ATTENTION})
        result = self.client.infer(MODEL, self.ids_inputs("in"), outputs=outputs)
        datatype, shape, _ = self.meta(result, "attentions")
        if not np.array_equal(self.read(outh, datatype, shape, 0), expected):
            wrong.append("the region after the churn")
        self.close()
        return {"cycles": cycles, "seen": seen, "wrong": wrong}

    def truncated(self) -> dict[str, Any]:
        inp = self.region("in", 2 * IDS.nbytes)
        shm.set_shared_memory_region(inp, [IDS, MASK])
        os.ftruncate(inp._mpsm_handle._fd, 8)  # the owner shrinks its object under the registered region
        out = {"infer": _error(lambda: self.client.infer(MODEL, self.ids_inputs("in")))}
        out["still serves"] = self.client.infer(MODEL, self.wire_inputs()).as_numpy("sequence_length").tolist()
        self.client.unregister_system_shared_memory()
        self.client.close()
        return out

    def limits(self) -> dict[str, Any]:
        self.region("a", 4096, register=False)
        key = self.key("a")
        results = []
        for i in range(8):
            results.append(_error(lambda i=i: self.client.register_system_shared_memory(f"r{i}", key, 4096)))
        out: dict[str, Any] = {"registers": results, "status": sorted(self.status())}
        self.close()
        return out

    def leave(self) -> dict[str, Any]:
        self.region("left", 4096)
        return {"status": sorted(self.status()), "key": self.key("left")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--protocol", choices=("grpc", "http"), required=True)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--prefix", default=f"shmtest_{os.getpid()}")
    args = parser.parse_args()
    program = Program(args.protocol, args.url, args.prefix)
    result = getattr(program, args.scenario)()
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
