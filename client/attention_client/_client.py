"""Synchronous client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from ._channel import ChannelSecurity, PemSource, channel_security
from ._proto.attention.v1 import attention_pb2 as pb
from ._proto.attention.v1 import attention_pb2_grpc as pb_grpc
from ._request import SequenceLike, build_request
from ._wire import split_response, split_result
from .errors import AttentionError
from .results import AnalyzeResult, ModelInfo

Metadata = Iterable[tuple[str, str]]

_SERVICE = pb.DESCRIPTOR.services_by_name["AttentionService"].full_name
ANALYZE = f"/{_SERVICE}/Analyze"
ANALYZE_STREAM = f"/{_SERVICE}/AnalyzeStream"

# Responses carry full attention matrices: lift gRPC's 4 MB receive default.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 64 << 20),
]


class _CallDefaults:
    """timeout and metadata set on the client, overridable per call."""

    timeout: float | None
    metadata: tuple[tuple[str, str], ...]
    _security: ChannelSecurity = ChannelSecurity()

    def _kw(self, timeout: float | None, metadata: Metadata | None) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self._security.with_call_metadata(self.metadata if metadata is None else tuple(metadata)),
        }


class AttentionClient(_CallDefaults):
    """Client for attention.v1.AttentionService.

    `timeout` (seconds) and `metadata` set here apply to every call unless a call
    passes its own. Failed calls raise AttentionError with the gRPC status code.
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
    ) -> None:
        self._security = channel_security(
            target, root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key, tls=tls, token=token, credentials=credentials)
        opts = CHANNEL_OPTIONS + list(options or [])
        creds = self._security.credentials
        self._channel = grpc.secure_channel(target, creds, opts) if creds else grpc.insecure_channel(target, opts)
        self._stub = pb_grpc.AttentionServiceStub(self._channel)
        # Analyze responses are decoded without copying their tensors (see _wire).
        self._analyze_raw = self._channel.unary_unary(
            ANALYZE, request_serializer=pb.AnalyzeRequest.SerializeToString, response_deserializer=None)
        self._stream_raw = self._channel.unary_stream(
            ANALYZE_STREAM, request_serializer=pb.AnalyzeRequest.SerializeToString, response_deserializer=None)
        self.timeout = timeout
        self.metadata = tuple(metadata or ())

    def analyze(
        self,
        sequences: SequenceLike | Iterable[SequenceLike],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> Any:
        """Analyze one sequence (returns an AnalyzeResult) or several (a list).

        A sequence is text, a (text, text_pair) tuple, or a list of token ids.
        Options: model, layers, heads, top_k, min_strength, exclude_special_tokens,
        attention, hidden_states, attention_dtype ("float32"/"float16"), ids.
        """
        request, single = build_request(sequences, **options)
        try:
            raw = self._analyze_raw(request, **self._kw(timeout, metadata))
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        results = [AnalyzeResult.from_parts(m, t) for m, t in split_response(raw)]
        return results[0] if single else results

    def analyze_stream(
        self,
        sequences: Iterable[SequenceLike],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> Iterator[AnalyzeResult]:
        """Like analyze, one result at a time in request order (AnalyzeStream)."""
        request, _ = build_request(sequences, **options)
        call = self._stream_raw(request, **self._kw(timeout, metadata))
        try:
            for raw in call:
                yield AnalyzeResult.from_parts(*split_result(raw))
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        finally:
            call.cancel()

    def list_models(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> list[ModelInfo]:
        try:
            response = self._stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout, metadata))
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        return [ModelInfo.from_pb(m) for m in response.models]

    def get_model(self, name: str = "", *, timeout: float | None = None,
                  metadata: Metadata | None = None) -> ModelInfo:
        """Metadata and heads of one model ('' for the server's default)."""
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
