"""A Triton client program for an ONNX BERT model, as users already run them:
nothing here knows about the attention service (only the address changes).

Runs in its own process: tritonclient registers the `inference` protos in the
default descriptor pool, as the server does, so the two cannot share a process.
Prints one JSON document with what it saw.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def _error(fn) -> dict:
    try:
        fn()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return {"status": None, "message": None}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--second", default="")
    args = parser.parse_args()
    c = grpcclient.InferenceServerClient(args.url)
    out: dict = {
        "live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready(args.model),
        "unknown_ready": c.is_model_ready("no-such-model"),
        "server": c.get_server_metadata(as_json=True),
        "metadata": c.get_model_metadata(args.model, as_json=True),
        "config": c.get_model_config(args.model, as_json=True)["config"],
    }
    stats_before = c.get_inference_statistics(args.model, as_json=True)["model_stats"][0]

    # The classic BERT call: numpy input_ids / attention_mask / token_type_ids, right-padded.
    ids = np.array([[101, 1996, 10938, 2121, 2944, 102, 0, 0],
                    [101, 7592, 2088, 102, 0, 0, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    inputs = []
    for name, value in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", np.zeros_like(ids))):
        tensor = grpcclient.InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    wanted = [grpcclient.InferRequestedOutput(n) for n in ("last_hidden_state", "attentions", "sequence_length")]
    result = c.infer(args.model, inputs, outputs=wanted, request_id="ids-1")
    out["ids"] = {n: result.as_numpy(n).tolist() for n in ("last_hidden_state", "attentions", "sequence_length")}
    out["ids_response_id"] = result.get_response().id

    # Text in, tokenized by the server; float16 attention and top-2 pairs.
    text = grpcclient.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([["The transformer model processes all tokens."], ["hello world"]],
                                      dtype=object))
    wanted = [grpcclient.InferRequestedOutput(n) for n in
              ("tokens", "sequence_length", "attentions_fp16", "pair_from_index", "pair_to_index", "pair_strength")]
    result = c.infer(args.model, [text], outputs=wanted, parameters={"top_k": 2})
    out["text"] = {n: result.as_numpy(n).tolist() for n in ("sequence_length", "pair_from_index", "pair_to_index",
                                                            "pair_strength")}
    out["text"]["tokens"] = [[t.decode() for t in row] for row in result.as_numpy("tokens")]
    att16 = result.as_numpy("attentions_fp16")
    out["text"]["attentions_fp16_dtype"] = str(att16.dtype)
    out["text"]["attentions_fp16"] = att16.astype(float).tolist()

    # Streaming: three requests on one stream, answers matched by request id.
    answers: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    for k in range(3):
        c.async_stream_infer(args.model, inputs, request_id=f"stream-{k}",
                             outputs=[grpcclient.InferRequestedOutput("last_hidden_state")])
    bad = grpcclient.InferInput("input_ids", [1, 2], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 2), np.float32))
    c.async_stream_infer(args.model, [bad], request_id="stream-bad")
    streamed, stream_errors = {}, []
    for _ in range(4):
        result, error = answers.get(timeout=120)
        if error is not None:
            stream_errors.append(str(error))
        else:
            streamed[result.get_response().id] = result.as_numpy("last_hidden_state").tolist()
    c.stop_stream()
    out["stream"] = streamed
    out["stream_errors"] = stream_errors

    out["errors"] = {
        "wrong_datatype": _error(lambda: c.infer(args.model, [bad])),
        "unknown_model": _error(lambda: c.infer("no-such-model", inputs)),
        "unknown_output": _error(lambda: c.infer(args.model, inputs,
                                                 outputs=[grpcclient.InferRequestedOutput("logits")])),
    }
    out["stats_before"] = stats_before
    out["stats_after"] = c.get_inference_statistics(args.model, as_json=True)["model_stats"][0]

    if args.second:
        out["index_before"] = c.get_model_repository_index(as_json=True).get("models", [])
        out["second_ready_before"] = c.is_model_ready(args.second)
        c.load_model(args.second)
        out["second_ready_loaded"] = c.is_model_ready(args.second)
        result = c.infer(args.second, inputs, outputs=[grpcclient.InferRequestedOutput("last_hidden_state")])
        out["second_hidden"] = result.as_numpy("last_hidden_state").tolist()
        c.unload_model(args.second)
        out["second_ready_unloaded"] = c.is_model_ready(args.second)
        out["index_after"] = c.get_model_repository_index(as_json=True).get("models", [])
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
