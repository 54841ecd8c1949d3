"""A Triton client program for an ONNX BERT model, as users already run them:
nothing here knows about the attention service (only the address changes).
`--protocol grpc` runs it with tritonclient.grpc, `--protocol http` with
tritonclient.http: the same calls, plus what only one of them has (gRPC's
streaming; HTTP's JSON tensors and compressed bodies).

Runs in its own process: tritonclient.grpc registers the `inference` protos in
the default descriptor pool, as the server does, so the two cannot share a
process. Prints one JSON document with what it saw.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
from typing import Any

import numpy as np
from tritonclient.utils import InferenceServerException

IDS = np.array([[101, 1996, 10938, 2121, 2944, 102, 0, 0],
                [101, 7592, 2088, 102, 0, 0, 0, 0]], dtype=np.int64)
TEXTS = [["The transformer model processes all tokens."], ["hello world"]]
ID_OUTPUTS = ("last_hidden_state", "attentions", "sequence_length")
PAIRS = ("pair_from_index", "pair_to_index", "pair_strength")
# The text call: float16 attention of two layers and two heads, and their top-2 pairs.
TEXT_PARAMETERS = {"top_k": 2, "layers": "0,5", "heads": "2,3"}


def _error(fn) -> dict:
    try:
        fn()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return {"status": None, "message": None}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="host:port, no scheme")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--second", default="")
    args = parser.parse_args()
    http = args.protocol == "http"
    if http:
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc
    c = tc.InferenceServerClient(args.url)

    def doc(call, *a) -> Any:
        """A JSON document: tritonclient.http returns one, tritonclient.grpc on request."""
        return call(*a) if http else call(*a, as_json=True)

    def index() -> list:
        """The repository index: a list over HTTP, a message with `models` over gRPC."""
        return c.get_model_repository_index() if http else c.get_model_repository_index(as_json=True).get("models", [])

    def response_id(result) -> str:
        response = result.get_response()
        return response.get("id", "") if http else response.id

    config = doc(c.get_model_config, args.model)
    out: dict = {
        "live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready(args.model),
        "unknown_ready": c.is_model_ready("no-such-model"),
        "server": doc(c.get_server_metadata),
        "metadata": doc(c.get_model_metadata, args.model),
        "config": config if http else config["config"],  # Triton's REST API returns the config itself
    }
    stats_before = doc(c.get_inference_statistics, args.model)["model_stats"][0]

    # The classic BERT call: numpy input_ids / attention_mask / token_type_ids, right-padded.
    def id_inputs(**binary: bool) -> list:
        inputs = []
        for name, value in (("input_ids", IDS), ("attention_mask", (IDS != 0).astype(np.int64)),
                            ("token_type_ids", np.zeros_like(IDS))):
            tensor = tc.InferInput(name, list(value.shape), "INT64")
            tensor.set_data_from_numpy(value, **binary)
            inputs.append(tensor)
        return inputs

    inputs = id_inputs()
    wanted = [tc.InferRequestedOutput(n) for n in ID_OUTPUTS]
    result = c.infer(args.model, inputs, outputs=wanted, request_id="ids-1", timeout=60_000_000)
    out["ids"] = {n: result.as_numpy(n).tolist() for n in ID_OUTPUTS}
    out["ids_response_id"] = response_id(result)

    # Text in, tokenized by the server; float16 attention and top-2 pairs of the heads asked for.
    text = tc.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array(TEXTS, dtype=object))
    wanted = [tc.InferRequestedOutput(n) for n in ("tokens", "sequence_length", "attentions_fp16", *PAIRS)]
    result = c.infer(args.model, [text], outputs=wanted, parameters=TEXT_PARAMETERS)
    out["text"] = {n: result.as_numpy(n).tolist() for n in ("sequence_length", *PAIRS)}
    out["text"]["tokens"] = [[t.decode() for t in row] for row in result.as_numpy("tokens")]
    att16 = result.as_numpy("attentions_fp16")
    out["text"]["attentions_fp16_dtype"] = str(att16.dtype)
    out["text"]["attentions_fp16"] = att16.astype(float).tolist()

    bad = tc.InferInput("input_ids", [1, 2], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 2), np.float32))
    if http:
        # Three more calls of two rows each, as the stream below makes: tensors as JSON both ways,
        # then the body compressed (the response may come compressed or not).
        wanted = [tc.InferRequestedOutput(n, binary_data=False) for n in (*ID_OUTPUTS, "tokens")]
        result = c.infer(args.model, id_inputs(binary_data=False), outputs=wanted)
        out["json"] = {n: result.as_numpy(n).tolist() for n in ID_OUTPUTS}
        out["json"]["tokens"] = [[str(t) for t in row] for row in result.as_numpy("tokens")]
        for algorithm in ("gzip", "deflate"):
            result = c.infer(args.model, inputs, outputs=[tc.InferRequestedOutput("last_hidden_state")],
                             request_compression_algorithm=algorithm, response_compression_algorithm=algorithm)
            out[algorithm] = result.as_numpy("last_hidden_state").tolist()
    else:
        # Streaming: three requests on one stream, answers matched by request id.
        answers: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        for k in range(3):
            c.async_stream_infer(args.model, inputs, request_id=f"stream-{k}",
                                 outputs=[tc.InferRequestedOutput("last_hidden_state")])
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

    many = tc.InferInput("text", [65], "BYTES")
    many.set_data_from_numpy(np.array([b"x"] * 65, dtype=object))
    out["errors"] = {
        "wrong_datatype": _error(lambda: c.infer(args.model, [bad])),
        "unknown_model": _error(lambda: c.infer("no-such-model", inputs)),
        "unknown_output": _error(lambda: c.infer(args.model, inputs, outputs=[tc.InferRequestedOutput("logits")])),
        "bad_parameter": _error(lambda: c.infer(args.model, inputs, parameters={"top_k": "two"})),
        "too_many_rows": _error(lambda: c.infer(args.model, [many])),
        "unknown_model_metadata": _error(lambda: c.get_model_metadata("no-such-model")),
    }
    out["stats_before"] = stats_before
    out["stats_after"] = doc(c.get_inference_statistics, args.model)["model_stats"][0]

    if args.second:
        out["index_before"] = index()
        out["second_ready_before"] = c.is_model_ready(args.second)
        c.load_model(args.second)
        out["second_ready_loaded"] = c.is_model_ready(args.second)
        result = c.infer(args.second, inputs, outputs=[tc.InferRequestedOutput("last_hidden_state")])
        out["second_hidden"] = result.as_numpy("last_hidden_state").tolist()
        c.unload_model(args.second)
        out["second_ready_unloaded"] = c.is_model_ready(args.second)
        out["index_after"] = index()
        out["errors"]["load_unknown"] = _error(lambda: c.load_model("no-such-model"))
    c.close()
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
