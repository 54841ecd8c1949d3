"""Synchronous client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from ._channel import ChannelSecurity, PemSource, channel_options, channel_security
from ._proto.attention.v1 import attention_pb2 as pb
from ._proto.attention.v1 import attention_pb2_grpc as pb_grpc
from ._request import (
    AttentionDType,
    Fusion,
    SequenceInput,
    batch_request,
    build_options,
    check_timeout,
    single_request,
)
from ._wire import split_response, split_result
from .errors import AttentionError, InternalError
from .results import AnalyzeResult, ModelInfo
from .tensors import TensorError

Metadata = Iterable[tuple[str, str]]
"""Call metadata: (key, value) pairs; keys lower case."""

_SERVICE = pb.DESCRIPTOR.services_by_name["AttentionService"].full_name
ANALYZE = f"/{_SERVICE}/Analyze"
ANALYZE_STREAM = f"/{_SERVICE}/AnalyzeStream"

class _CallDefaults:
    """timeout, metadata and wait_for_ready set on the client; timeout and metadata overridable per call."""

    timeout: float | None
    metadata: tuple[tuple[str, str], ...]
    wait_for_ready: bool = False
    _security: ChannelSecurity = ChannelSecurity()

    def _kw(self, timeout: float | None, metadata: Metadata | None) -> dict[str, Any]:
        check_timeout(timeout)
        kw: dict[str, Any] = {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self._security.with_call_metadata(self.metadata if metadata is None else tuple(metadata)),
        }
        if self.wait_for_ready:  # else the service config decides (fail fast unless it says waitForReady)
            kw["wait_for_ready"] = True
        return kw


def _decode_failed(exc: TensorError) -> InternalError:
    return InternalError(f"response: could not decode the server's tensors: {exc}")


class AttentionClient(_CallDefaults):
    """Client for attention.v1.AttentionService.

    `timeout` (seconds) and `metadata` set here apply to every call unless a call
    passes its own. Every failure raises an AttentionError subclass (errors.py):
    InvalidArgumentError for bad arguments (before any call when the SDK can tell),
    else the class of the call's gRPC status, with `.request_id` and `.retryable`.
    Use as a context manager, or call close().

    Security (plaintext unless one of these is given):

    - `root_certificates`: the CA(s) that signed the server's certificate.
    - `certificate_chain` and `private_key`: this client's certificate and key, for
      a server that requires mutual TLS (both or neither).
    - `tls=True`: TLS with gRPC's default roots (the Mozilla set grpcio ships, or
      the file named by $GRPC_DEFAULT_SSL_ROOTS_FILE_PATH); implied by the above.
    - `credentials`: ready-made grpc.ChannelCredentials, instead of the PEM arguments.

    Each PEM argument is bytes, PEM text, or the path (str or Path) of a PEM file;
    files are read once, here. A missing file raises FileNotFoundError naming it.

    `token` is sent as `authorization: Bearer <token>` on every call. When it is
    None, $ATTENTION_TOKEN is used if set; pass token="" to send none. Over TLS
    the token travels as gRPC call credentials. Over plaintext (gRPC refuses call
    credentials there) it is added as call metadata instead: meant for a server on
    this machine, it warns for any other target, since anyone on the path can read it.

    Targets and balancing: `target` is any gRPC target: `host:port`, `dns:///name:port`
    (every address the name resolves to, e.g. a Kubernetes headless Service's pods),
    `ipv4:10.0.0.1:50051,10.0.0.2:50051`, `unix:/path`. Calls are spread over all the
    addresses with `round_robin`, and Analyze, AnalyzeStream (until its first result),
    ListModels and GetModel are retried on UNAVAILABLE (a replica down or draining; also
    CANCELLED from a server shutting down) with backoff, up to 5 attempts within the call's
    timeout; never on INVALID_ARGUMENT, RESOURCE_EXHAUSTED or a deadline. `wait_for_ready=True`
    makes calls wait, up to their timeout, for a replica to be reachable instead of failing
    at once with UNAVAILABLE.
    `options` are gRPC channel options; each one given replaces the SDK's for its key (e.g.
    `("grpc.service_config", json_text)`, `("grpc.lb_policy_name", "pick_first")`,
    `("grpc.enable_retries", 0)`).
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        root_certificates: PemSource | None = None,
        certificate_chain: PemSource | None = None,
        private_key: PemSource | None = None,
        tls: bool = False,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: list[tuple[str, Any]] | None = None,
        wait_for_ready: bool = False,
    ) -> None:
        check_timeout(timeout)
        self._security = channel_security(
            target, root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key, tls=tls, token=token, credentials=credentials)
        self.wait_for_ready = wait_for_ready
        opts = channel_options(options)
        creds = self._security.credentials
        self._channel = grpc.secure_channel(target, creds, opts) if creds else grpc.insecure_channel(target, opts)
        self._stub = pb_grpc.AttentionServiceStub(self._channel)
        # Analyze responses are decoded without copying their tensors (see _wire).
        self._analyze_raw: grpc.UnaryUnaryMultiCallable[pb.AnalyzeRequest, bytes] = self._channel.unary_unary(
            ANALYZE, request_serializer=pb.AnalyzeRequest.SerializeToString, response_deserializer=None)
        self._stream_raw: grpc.UnaryStreamMultiCallable[pb.AnalyzeRequest, bytes] = self._channel.unary_stream(
            ANALYZE_STREAM, request_serializer=pb.AnalyzeRequest.SerializeToString, response_deserializer=None)
        self.timeout = timeout
        self.metadata = tuple(metadata or ())

    def analyze(
        self,
        sequence: SequenceInput,
        *,
        text_pair: str | None = None,
        model: str = "",
        layers: Iterable[int] | None = None,
        heads: Iterable[int] | None = None,
        attention: bool = True,
        attention_dtype: AttentionDType = "float32",
        hidden_states: bool = True,
        top_k: int | None = None,
        min_strength: float = 0.0,
        exclude_special_tokens: bool = False,
        word_level: bool = False,
        head_statistics: bool = False,
        rollout: Fusion | None = None,
        hidden_states_layers: Iterable[int] | None = None,
        query_key: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AnalyzeResult:
        """Analyze one sequence: its attention, hidden states and pairs (one AnalyzeResult).

        - `sequence`: text (tokenized by the server, special tokens added), or token ids
          (a list or 1-D integer array, used as given). Several: analyze_batch.
        - `text_pair`: a second text for sentence-pair input (segment 1); text only.
        - `model`: a served model's name; '' for the server's default.
        - `layers`, `heads`: which layers and heads (0-based) the matrices and pairs cover,
          in the order given; None (the default) for all. An empty list is an error.
        - `attention`: return the full matrices (`result.attention`); `attention_dtype`
          "float32" or "float16" (half the bytes).
        - `hidden_states`: return the last hidden states [seq, hidden].
        - `top_k`: the k strongest (from, to) pairs of every selected head
          (`result.pairs`); None for none. `min_strength` (0..1) drops weaker pairs;
          `exclude_special_tokens` leaves pairs with [CLS]/[SEP] out of the lists.
        - `word_level`: the word-level view (`words`, `word_attention`, `word_pairs`).
        - `head_statistics`: per-head statistics of this sequence.
        - `rollout`: attention rollout with heads fused by "mean", "max" or "min".
        - `hidden_states_layers`: hidden states of these layers (0: embeddings ..
          num_layers: last layer, as Hugging Face's output_hidden_states), in
          `result.hidden_states_by_layer`; None for none.
        - `query_key`: the query and key vectors of the selected layers/heads
          (`result.queries`, `result.keys`; what bertviz's neuron view draws).
        - `timeout` (seconds) and `metadata`: for this call, instead of the client's.

        Raises InvalidArgumentError before the call for a bad value the SDK can check,
        else the AttentionError subclass of the call's status.
        """
        options = build_options(
            layers=layers, heads=heads, attention=attention, attention_dtype=attention_dtype,
            hidden_states=hidden_states, top_k=top_k, min_strength=min_strength,
            exclude_special_tokens=exclude_special_tokens, word_level=word_level,
            head_statistics=head_statistics, rollout=rollout,
            hidden_states_layers=hidden_states_layers, query_key=query_key)
        request = single_request(sequence, text_pair=text_pair, model=model, options=options)
        [result] = self._unary(request, timeout, metadata)
        return result

    def analyze_batch(
        self,
        sequences: Iterable[SequenceInput],
        *,
        text_pairs: Sequence[str | None] | None = None,
        ids: Sequence[str] | None = None,
        model: str = "",
        layers: Iterable[int] | None = None,
        heads: Iterable[int] | None = None,
        attention: bool = True,
        attention_dtype: AttentionDType = "float32",
        hidden_states: bool = True,
        top_k: int | None = None,
        min_strength: float = 0.0,
        exclude_special_tokens: bool = False,
        word_level: bool = False,
        head_statistics: bool = False,
        rollout: Fusion | None = None,
        hidden_states_layers: Iterable[int] | None = None,
        query_key: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[AnalyzeResult]:
        """Analyze a batch in one call: one AnalyzeResult per sequence, in order.

        `sequences` are texts or token-id lists, as for analyze. `text_pairs` gives each
        sequence its second text (None for none) and `ids` a label echoed in
        `result.id`; both have one entry per sequence. The other options are analyze's.
        The server caps a batch (`ModelInfo.max_batch_size`) and the size of one
        response: for large batches with full matrices use analyze_stream.
        """
        options = build_options(
            layers=layers, heads=heads, attention=attention, attention_dtype=attention_dtype,
            hidden_states=hidden_states, top_k=top_k, min_strength=min_strength,
            exclude_special_tokens=exclude_special_tokens, word_level=word_level,
            head_statistics=head_statistics, rollout=rollout,
            hidden_states_layers=hidden_states_layers, query_key=query_key)
        request = batch_request(sequences, text_pairs=text_pairs, ids=ids, model=model, options=options)
        return self._unary(request, timeout, metadata)

    def analyze_stream(
        self,
        sequences: Iterable[SequenceInput],
        *,
        text_pairs: Sequence[str | None] | None = None,
        ids: Sequence[str] | None = None,
        model: str = "",
        layers: Iterable[int] | None = None,
        heads: Iterable[int] | None = None,
        attention: bool = True,
        attention_dtype: AttentionDType = "float32",
        hidden_states: bool = True,
        top_k: int | None = None,
        min_strength: float = 0.0,
        exclude_special_tokens: bool = False,
        word_level: bool = False,
        head_statistics: bool = False,
        rollout: Fusion | None = None,
        hidden_states_layers: Iterable[int] | None = None,
        query_key: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Iterator[AnalyzeResult]:
        """Like analyze_batch, one result at a time in request order, each as soon as the
        server has it (AnalyzeStream). Arguments are checked before the first result is
        asked for; leaving the loop early cancels the call."""
        options = build_options(
            layers=layers, heads=heads, attention=attention, attention_dtype=attention_dtype,
            hidden_states=hidden_states, top_k=top_k, min_strength=min_strength,
            exclude_special_tokens=exclude_special_tokens, word_level=word_level,
            head_statistics=head_statistics, rollout=rollout,
            hidden_states_layers=hidden_states_layers, query_key=query_key)
        request = batch_request(sequences, text_pairs=text_pairs, ids=ids, model=model, options=options)
        return self._stream(request, self._kw(timeout, metadata))

    def _unary(self, request: pb.AnalyzeRequest, timeout: float | None,
               metadata: Metadata | None) -> list[AnalyzeResult]:
        try:
            raw = self._analyze_raw(request, **self._kw(timeout, metadata))
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        try:
            return [AnalyzeResult.from_parts(m, t) for m, t in split_response(raw)]
        except TensorError as exc:
            raise _decode_failed(exc) from exc

    def _stream(self, request: pb.AnalyzeRequest, kw: dict[str, Any]) -> Iterator[AnalyzeResult]:
        call = self._stream_raw(request, **kw)
        try:
            for raw in call:
                try:
                    parts = split_result(raw)
                except TensorError as exc:
                    raise _decode_failed(exc) from exc
                yield AnalyzeResult.from_parts(*parts)
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        finally:
            call.cancel()

    def list_models(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> list[ModelInfo]:
        """Metadata and heads of every served model."""
        try:
            response = self._stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout, metadata))
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        return [ModelInfo.from_pb(m) for m in response.models]

    def get_model(self, name: str = "", *, timeout: float | None = None,
                  metadata: Metadata | None = None) -> ModelInfo:
        """Metadata and heads of one model ('' for the server's default); NotFoundError for an unknown name."""
        try:
            return ModelInfo.from_pb(self._stub.GetModel(pb.GetModelRequest(name=name), **self._kw(timeout, metadata)))
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AttentionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
