"""asyncio client: the same names and arguments as AttentionClient, awaitable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from ._channel import PemSource, channel_options, channel_security
from ._client import ANALYZE, ANALYZE_STREAM, Metadata, _CallDefaults, _decode_failed
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
from .errors import AttentionError
from .results import AnalyzeResult, ModelInfo
from .tensors import TensorError


class AsyncAttentionClient(_CallDefaults):
    """asyncio twin of AttentionClient (grpc.aio). Use `async with`, or await close().

    Takes the same arguments as AttentionClient, TLS, mutual TLS, `token`
    ($ATTENTION_TOKEN when None), any gRPC target with round_robin and retries, `options`
    and `wait_for_ready` included, and raises the same errors; see its docstring.
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
        self._channel = (
            grpc.aio.secure_channel(target, creds, opts) if creds else grpc.aio.insecure_channel(target, opts)
        )
        self._stub = pb_grpc.AttentionServiceStub(self._channel)
        # Analyze responses are decoded without copying their tensors (see _wire).
        self._analyze_raw: grpc.aio.UnaryUnaryMultiCallable[pb.AnalyzeRequest, bytes] = self._channel.unary_unary(
            ANALYZE, request_serializer=pb.AnalyzeRequest.SerializeToString, response_deserializer=None)
        self._stream_raw: grpc.aio.UnaryStreamMultiCallable[pb.AnalyzeRequest, bytes] = self._channel.unary_stream(
            ANALYZE_STREAM, request_serializer=pb.AnalyzeRequest.SerializeToString, response_deserializer=None)
        self.timeout = timeout
        self.metadata = tuple(metadata or ())

    async def analyze(
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
        """One sequence, one result: see AttentionClient.analyze for every argument."""
        options = build_options(
            layers=layers, heads=heads, attention=attention, attention_dtype=attention_dtype,
            hidden_states=hidden_states, top_k=top_k, min_strength=min_strength,
            exclude_special_tokens=exclude_special_tokens, word_level=word_level,
            head_statistics=head_statistics, rollout=rollout,
            hidden_states_layers=hidden_states_layers, query_key=query_key)
        request = single_request(sequence, text_pair=text_pair, model=model, options=options)
        [result] = await self._unary(request, timeout, metadata)
        return result

    async def analyze_batch(
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
        """A batch in one call, a list of results: see AttentionClient.analyze_batch."""
        options = build_options(
            layers=layers, heads=heads, attention=attention, attention_dtype=attention_dtype,
            hidden_states=hidden_states, top_k=top_k, min_strength=min_strength,
            exclude_special_tokens=exclude_special_tokens, word_level=word_level,
            head_statistics=head_statistics, rollout=rollout,
            hidden_states_layers=hidden_states_layers, query_key=query_key)
        request = batch_request(sequences, text_pairs=text_pairs, ids=ids, model=model, options=options)
        return await self._unary(request, timeout, metadata)

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
    ) -> AsyncIterator[AnalyzeResult]:
        """`async for` over the results as they come: see AttentionClient.analyze_stream.
        Arguments are checked when this is called, before anything is sent."""
        options = build_options(
            layers=layers, heads=heads, attention=attention, attention_dtype=attention_dtype,
            hidden_states=hidden_states, top_k=top_k, min_strength=min_strength,
            exclude_special_tokens=exclude_special_tokens, word_level=word_level,
            head_statistics=head_statistics, rollout=rollout,
            hidden_states_layers=hidden_states_layers, query_key=query_key)
        request = batch_request(sequences, text_pairs=text_pairs, ids=ids, model=model, options=options)
        return self._stream(request, self._kw(timeout, metadata))

    async def _unary(self, request: pb.AnalyzeRequest, timeout: float | None,
                     metadata: Metadata | None) -> list[AnalyzeResult]:
        try:
            raw = await self._analyze_raw(request, **self._kw(timeout, metadata))
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        try:
            return [AnalyzeResult.from_parts(m, t) for m, t in split_response(raw)]
        except TensorError as exc:
            raise _decode_failed(exc) from exc

    async def _stream(self, request: pb.AnalyzeRequest, kw: dict[str, Any]) -> AsyncIterator[AnalyzeResult]:
        call = self._stream_raw(request, **kw)
        try:
            async for raw in call:
                try:
                    parts = split_result(raw)
                except TensorError as exc:
                    raise _decode_failed(exc) from exc
                yield AnalyzeResult.from_parts(*parts)
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        finally:
            call.cancel()

    async def list_models(self, *, timeout: float | None = None,
                          metadata: Metadata | None = None) -> list[ModelInfo]:
        """Metadata and heads of every served model."""
        try:
            response = await self._stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout, metadata))
        except grpc.RpcError as exc:
            raise AttentionError.from_rpc_error(exc) from exc
        return [ModelInfo.from_pb(m) for m in response.models]

    async def get_model(self, name: str = "", *, timeout: float | None = None,
                        metadata: Metadata | None = None) -> ModelInfo:
        """Metadata and heads of one model ('' for the server's default); NotFoundError for an unknown name."""
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
