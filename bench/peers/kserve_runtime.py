"""KServe's Python model server with the smallest custom model its documentation
shows: a `kserve.Model` subclass whose `load` opens the ONNX Runtime session and
whose `predict` answers an Open Inference Protocol (v2) request, started by
`kserve.ModelServer().start([model])`. Everything else is KServe's defaults.

Runs in .venv-bench-kserve, from the repository root:
`python -m bench.peers.kserve_runtime --model_name minilm-l6 --model_path .../model.onnx
--grpc_port 0 --http_port 0` (KServe reads its own flags from the same command line)."""

from __future__ import annotations

import argparse

from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server

from bench.peers.session import AttentionSession


class AttentionModel(Model):
    """input_ids and attention_mask in; last_hidden_state and attentions (FP32) out."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.session: AttentionSession | None = None

    def load(self) -> bool:
        self.session = AttentionSession(self.path)
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        assert self.session is not None, "predict before load"
        given = {item.name: item.as_numpy() for item in payload.inputs}
        outputs = []
        for name, array in self.session.run(given["input_ids"], given["attention_mask"]).items():
            output = InferOutput(name=name, shape=list(array.shape), datatype="FP32")
            output.set_data_from_numpy(array)  # binary: raw_output_contents over gRPC
            outputs.append(output)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=outputs)


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True, help="the model.onnx to serve")
    args, _ = parser.parse_known_args()
    model = AttentionModel(args.model_name, args.model_path)
    model.load()
    ModelServer().start([model])


if __name__ == "__main__":
    main()
