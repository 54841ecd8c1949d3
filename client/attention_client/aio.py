"""asyncio client: the same names as AttentionClient, awaitable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from ._channel import PemSource, channel_security
from ._client import ANALYZE, ANALYZE_STREAM, CHANNEL_OPTIONS, Metadata, _CallDefaults
from ._proto.attention.v1 import attention_pb2 as pb
from ._proto.attention.v1 import attention_pb2_grpc as pb_grpc
from ._request import SequenceLike, build_request
from ._wire import split_response, split_result
from .errors import AttentionError
from .results import AnalyzeResult, ModelInfo


class AsyncAttentionClient(_CallDefaults):
    """asyncio twin of AttentionClient (grpc.aio). Use `async with`, or await close().

    Takes the same arguments as AttentionClient, TLS, mutual TLS and `token`
    ($ATTENTION_TOKEN when None) included; see its docstring.
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
        self._channel = (
            grpc.aio.secure_channel(target, creds, opts) if creds else grpc.aio.insecure_channel(target, opts)
        )
        self._stub = pb_grpc.AttentionServiceStub(self._channel)
        # Analyze responses are decoded without copying their tensors (see _wire).
        self._analyze_raw = self._channel.unary_unary(
            ANALYZE, request_serializer=pb.AnalyzeRequest.SerializeToString, response_deserializer=None)
        self._stream_raw = self._channel.unary_stream(
            ANALYZE_STREAM, request_serializer=pb.AnalyzeRequest.SerializeToString, response_deserializer=None)
        self.timeout = timeout
        self.metadata = tuple(metadata or ())

    async def analyze(
        self,
        sequences: SequenceLike | Iterable[SequenceLike],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> Any:
        """See AttentionClient.analyze."""
        request, single = build_request(sequences, **options)
        try:
            raw = await self._analyze_raw(request, **self._kw(timeout, metadata))
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        results = [AnalyzeResult.from_parts(m, t) for m, t in split_response(raw)]
        return results[0] if single else results

    async def analyze_stream(
        self,
        sequences: Iterable[SequenceLike],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> AsyncIterator[AnalyzeResult]:
        """See AttentionClient.analyze_stream."""
        request, _ = build_request(sequences, **options)
        call = self._stream_raw(request, **self._kw(timeout, metadata))
        try:
            async for raw in call:
                yield AnalyzeResult.from_parts(*split_result(raw))
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        finally:
            call.cancel()

    async def list_models(self, *, timeout: float | None = None,
                          metadata: Metadata | None = None) -> list[ModelInfo]:
        try:
            response = await self._stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout, metadata))
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        return [ModelInfo.from_pb(m) for m in response.models]

    async def get_model(self, name: str = "", *, timeout: float | None = None,
                        metadata: Metadata | None = None) -> ModelInfo:
        try:
            msg = await self._stub.GetModel(pb.GetModelRequest(name=name), **self._kw(timeout, metadata))
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        return ModelInfo.from_pb(msg)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncAttentionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
