"""A small in-process AttentionService for the SDK's and CLI's unit tests: no model, no
attention_server. It answers with made-up but well-formed results and fails on request:
a text "!UNAVAILABLE" (any status name) makes the call end with that status, the
message "fake failure" and the trailing request id "fake-<n>"."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client.tensors import to_tensor

SERVICE = "attention.v1.AttentionService"
LAYERS, HEADS, HIDDEN = 2, 3, 4


class FakeService:
    """Bind with `with FakeService() as fake:`; `fake.target`, `fake.requests` (every AnalyzeRequest seen)."""

    def __init__(self, max_batch_size: int = 4) -> None:
        self.max_batch_size = max_batch_size
        self.requests: list[pb.AnalyzeRequest] = []
        self.methods: list[str] = []  # "Analyze" or "AnalyzeStream", one per request
        self.corrupt = False  # True: every result's attention has fewer bytes than its shape needs
        self._calls = 0
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Analyze": grpc.unary_unary_rpc_method_handler(
                self.analyze, pb.AnalyzeRequest.FromString, pb.AnalyzeResponse.SerializeToString),
            "AnalyzeStream": grpc.unary_stream_rpc_method_handler(
                self.analyze_stream, pb.AnalyzeRequest.FromString, pb.SequenceResult.SerializeToString),
            "GetModel": grpc.unary_unary_rpc_method_handler(
                self.get_model, pb.GetModelRequest.FromString, pb.ModelInfo.SerializeToString),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.list_models, pb.ListModelsRequest.FromString, pb.ListModelsResponse.SerializeToString),
        })])
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeService:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(0).wait(10)

    # --- handlers ---------------------------------------------------------------------------------------------

    def _fail_if_asked(self, seq: pb.Sequence, context: grpc.ServicerContext) -> None:
        if seq.WhichOneof("input") == "text" and seq.text.startswith("!"):
            with self._lock:
                self._calls += 1
                rid = f"fake-{self._calls}"
            context.set_trailing_metadata(((("x-request-id", rid)),))
            context.abort(getattr(grpc.StatusCode, seq.text[1:]), "fake failure")

    def _result(self, index: int, seq: pb.Sequence, options: pb.AnalyzeOptions) -> pb.SequenceResult:
        if seq.WhichOneof("input") == "text":
            words = ["[CLS]", *seq.text.lower().split(), "[SEP]"]
            if seq.text_pair:
                words += [*seq.text_pair.lower().split(), "[SEP]"]
            ids = [100 + k for k in range(len(words))]
        else:
            ids = list(seq.token_ids.ids)
            words = [f"t{i}" for i in ids]
        n = len(words)
        layers = list(options.layers) or list(range(LAYERS))
        heads = list(options.heads) or list(range(HEADS))
        msg = pb.SequenceResult(index=index, id=seq.id, layers=layers, heads=heads)
        for k, (token_id, text) in enumerate(zip(ids, words, strict=True)):
            special = text.startswith("[")
            msg.tokens.add(id=token_id, text=text, start=-1 if special else k, end=-1 if special else k + 1,
                           word_index=-1 if special else k, special=special)
        rng = np.random.default_rng(n)
        att = rng.random((len(layers), len(heads), n, n)).astype(np.float32)
        att /= att.sum(-1, keepdims=True)
        if not options.HasField("attention") or options.attention:
            dtype = np.float16 if options.attention_dtype == pb.DATA_TYPE_FLOAT16 else np.float32
            to_tensor(att.astype(dtype), msg.attention)
        if not options.HasField("hidden_states") or options.hidden_states:
            to_tensor(rng.random((n, HIDDEN)).astype(np.float32), msg.hidden_states)
        if options.HasField("top_k"):
            for li, layer in enumerate(layers):
                for hi, head in enumerate(heads):
                    hp = msg.pairs.add(head=pb.Head(layer=layer, index=head))
                    flat = np.argsort(att[li, hi].ravel())[::-1][: options.top_k]
                    for cell in flat:
                        hp.pairs.add(from_index=int(cell // n), to_index=int(cell % n),
                                     strength=float(att[li, hi].ravel()[cell]))
        if self.corrupt:
            msg.attention.data = msg.attention.data[:-4]
        if options.word_level:
            for k, text in enumerate(words):
                msg.words.add(text=text, first_token=k, end_token=k + 1, special=text.startswith("["))
            if not options.HasField("attention") or options.attention:
                to_tensor(att, msg.word_attention)
        return msg

    def analyze(self, request: pb.AnalyzeRequest, context: grpc.ServicerContext) -> pb.AnalyzeResponse:
        self.requests.append(request)
        self.methods.append("Analyze")
        for seq in request.sequences:
            self._fail_if_asked(seq, context)
        return pb.AnalyzeResponse(model="fake", results=[self._result(k, s, request.options)
                                                         for k, s in enumerate(request.sequences)])

    def analyze_stream(self, request: pb.AnalyzeRequest, context: grpc.ServicerContext) -> Iterator[pb.SequenceResult]:
        self.requests.append(request)
        self.methods.append("AnalyzeStream")
        for k, seq in enumerate(request.sequences):
            self._fail_if_asked(seq, context)
            yield self._result(k, seq, request.options)

    def model_info(self) -> pb.ModelInfo:
        info = pb.ModelInfo(name="fake", architecture="FakeModel", num_layers=LAYERS, num_heads=HEADS,
                            hidden_size=HIDDEN, max_positions=64, vocab_size=1000,
                            max_batch_size=self.max_batch_size)
        for layer in range(LAYERS):
            for head in range(HEADS):
                info.heads.add(layer=layer, index=head, role="broad" if head else "previous_token")
        return info

    def get_model(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        if request.name not in ("", "fake"):
            context.set_trailing_metadata((("x-request-id", "fake-model"),))
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} is not served")
        return self.model_info()

    def list_models(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self.model_info()])
