"""MLServer with the smallest custom runtime its documentation shows: an
`mlserver.MLModel` subclass named by `implementation` in a model-settings.json
(bench/peers/mlserver/*/minilm-l6/), whose `load` opens the ONNX Runtime session
on the file `parameters.uri` names and whose `predict` decodes and encodes the
tensors with MLServer's NumpyCodec. Everything else is MLServer's defaults
(among them one parallel inference worker process), but for what settings.json
says: loopback, ports chosen by the system, no metrics server.

Started by bench.peers.servers: `mlserver start bench/peers/mlserver/plain` (or
`adaptive`: the same model with MLServer's adaptive batching on), with the
repository root on PYTHONPATH."""

from __future__ import annotations

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

from bench.peers.session import AttentionSession


class AttentionModel(MLModel):
    """input_ids and attention_mask in; last_hidden_state and attentions (FP32) out."""

    async def load(self) -> bool:
        self.session = AttentionSession(await get_model_uri(self.settings))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        given = {item.name: NumpyCodec.decode_input(item) for item in payload.inputs}
        outputs = self.session.run(given["input_ids"], given["attention_mask"])
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(name, array) for name, array in outputs.items()])
