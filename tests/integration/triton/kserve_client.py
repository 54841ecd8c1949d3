"""bert_client.py's calls with KServe's own REST client (`kserve.InferenceRESTClient`,
Open Inference Protocol v2), which offers health and inference only: the same
tensors in, the same JSON document out (under the same keys), so the numbers
can be compared with tritonclient's. Nothing here knows about the attention
service but its URL.

Runs in its own process: kserve registers the `inference` protos under the
same names as the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import httpx
import numpy as np
from bert_client import ID_OUTPUTS, IDS, PAIRS, TEXT_PARAMETERS, TEXTS
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


def _inputs(binary: bool) -> list[InferInput]:
    inputs = []
    for name, value in (("input_ids", IDS), ("attention_mask", (IDS != 0).astype(np.int64)),
                        ("token_type_ids", np.zeros_like(IDS))):
        tensor = InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value, binary_data=binary)
        inputs.append(tensor)
    return inputs


async def _error(call) -> dict:
    try:
        await call
    except httpx.HTTPStatusError as exc:
        return {"status": str(exc.response.status_code), "message": exc.response.json().get("error")}
    return {"status": None, "message": None}


async def run(url: str, model: str) -> dict:
    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=120)) as c:
        out: dict = {"live": await c.is_server_live(url), "ready": await c.is_server_ready(url),
                     "model_ready": await c.is_model_ready(url, model),
                     "unknown_ready": await c.is_model_ready(url, "no-such-model")}

        # Tensors in binary, outputs asked for in binary; then both as JSON (KServe's default).
        wanted = [RequestedOutput(n, {"binary_data": True}) for n in ID_OUTPUTS]
        result = await c.infer(url, InferRequest(model, _inputs(True), request_id="ids-1",
                                                 request_outputs=wanted), model_name=model)
        out["ids"] = {o.name: o.as_numpy().tolist() for o in result.outputs}
        out["ids_response_id"] = result.id
        request = InferRequest(model, _inputs(False), request_outputs=[RequestedOutput(n) for n in ID_OUTPUTS])
        result = await c.infer(url, request, model_name=model)
        out["json"] = {o.name: o.as_numpy().tolist() for o in result.outputs}

        text = InferInput("text", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array(TEXTS, dtype=object), binary_data=False)
        wanted = [RequestedOutput(n, {"binary_data": True}) for n in
                  ("tokens", "sequence_length", "attentions_fp16", *PAIRS)]
        result = await c.infer(url, InferRequest(model, [text], parameters=TEXT_PARAMETERS, request_outputs=wanted),
                               model_name=model)
        arrays = {o.name: o.as_numpy() for o in result.outputs}
        out["text"] = {n: arrays[n].tolist() for n in ("sequence_length", *PAIRS)}
        out["text"]["tokens"] = [[str(t) for t in row] for row in arrays["tokens"]]
        out["text"]["attentions_fp16_dtype"] = str(arrays["attentions_fp16"].dtype)
        out["text"]["attentions_fp16"] = arrays["attentions_fp16"].astype(float).tolist()

        bad = InferInput("input_ids", [1, 2], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 2), np.float32))
        out["errors"] = {
            "wrong_datatype": await _error(c.infer(url, InferRequest(model, [bad]), model_name=model)),
            "unknown_model": await _error(c.infer(url, InferRequest("no-such-model", _inputs(True)),
                                                  model_name="no-such-model")),
            "unknown_output": await _error(c.infer(url, InferRequest(model, _inputs(True), request_outputs=[
                RequestedOutput("logits")]), model_name=model)),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="http://host:port")
    parser.add_argument("--model", default="minilm-l6")
    args = parser.parse_args()
    json.dump(asyncio.run(run(args.url, args.model)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
