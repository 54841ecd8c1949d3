"""Server reflection for generic clients (grpcurl, Postman, grpcui): grpc.reflection.v1
and its predecessor v1alpha, both answering from the protos as written, comments
included.

grpcio-reflection ships only v1alpha. The v1 messages are wire-identical to it, so
the v1 service here passes each message across by its bytes and runs
grpcio-reflection's own servicer: one implementation behind both names.

Both answer from a descriptor pool of their own, built from descriptors.binpb:
every proto under proto/ with its source info, written by `make proto` next to the
stubs, because generated Python code drops the comments. Not the process's default
pool: it holds the generated files under the same names already (adding the
commented ones would conflict), and whatever else the process imports. Served
services that descriptors.binpb lacks (health, grpcio-reflection's v1alpha) are
copied in from their generated descriptors.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from functools import partial
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

from .._proto.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from .._proto.grpc.reflection.v1 import reflection_pb2_grpc as v1_grpc

log = logging.getLogger(__name__)

DESCRIPTOR_SET = "descriptors.binpb"
"""In attention_server._proto: a FileDescriptorSet of proto/ with imports and comments (tools/gen_proto.py)."""

V1_SERVICE_NAME = v1_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1ALPHA_SERVICE_NAME: str = v1alpha.SERVICE_NAME


class _File:
    """A file of the pool as reflection sends it. The pool's own FileDescriptor
    (protobuf's upb backend) copies out without source info, so the comments would
    be lost: this one copies out the FileDescriptorProto it was built from."""

    def __init__(self, pool: SourcePool, descriptor: FileDescriptor) -> None:
        self._pool = pool
        self._descriptor = descriptor

    @property
    def name(self) -> str:
        return self._descriptor.name

    @property
    def dependencies(self) -> list[_File]:
        return [_File(self._pool, d) for d in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        proto.CopyFrom(self._pool.source(self.name))


class SourcePool:
    """A separate DescriptorPool that keeps each file's FileDescriptorProto, so that the
    files it hands out (FindFileByName, FindFileContainingSymbol) copy out with their
    comments. Other lookups are the DescriptorPool's own."""

    def __init__(self) -> None:
        self._pool = descriptor_pool.DescriptorPool()
        self._sources: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        """Add a file whose dependencies are in the pool already (TypeError on a conflict)."""
        self._pool.Add(proto)
        self._sources[proto.name] = proto

    def add_generated(self, file: FileDescriptor) -> None:
        """Add a file of generated code (no comments), dependencies first, unless the pool has it."""
        if file.name in self._sources:
            return
        for dependency in file.dependencies:
            self.add_generated(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        self.add(proto)

    def source(self, name: str) -> descriptor_pb2.FileDescriptorProto:
        return self._sources[name]

    def FindFileByName(self, name: str) -> _File:
        return _File(self, self._pool.FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str) -> _File:
        try:
            file = self._pool.FindFileContainingSymbol(symbol)
        except KeyError:  # upb looks up no method names (`grpcurl describe pkg.Service.Method` asks for one)
            file = self._pool.FindMethodByName(symbol).containing_service.file
        return _File(self, file)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def documented_pool(service_names: Iterable[str]) -> SourcePool:
    """The pool reflection serves: descriptors.binpb, plus the generated descriptors of
    any service in `service_names` it lacks. A file that cannot be added is logged and
    left out (reflection then cannot describe what it holds); the server still starts."""
    pool = SourcePool()
    try:
        data = resources.files("attention_server._proto").joinpath(DESCRIPTOR_SET).read_bytes()
        files = descriptor_pb2.FileDescriptorSet.FromString(data)
    except (OSError, DecodeError) as exc:
        log.warning("reflection: %s unreadable (%s); describing without comments", DESCRIPTOR_SET, exc)
        files = descriptor_pb2.FileDescriptorSet()
    for proto in files.file:  # protoc writes a file's imports before it
        _quietly(partial(pool.add, proto), proto.name)
    for name in service_names:
        try:
            pool.FindServiceByName(name)
            continue
        except KeyError:
            pass
        try:
            file = descriptor_pool.Default().FindServiceByName(name).file
        except KeyError:
            log.warning("reflection: no descriptor for %s; it is listed but cannot be described", name)
            continue
        _quietly(partial(pool.add_generated, file), file.name)
    return pool


def _quietly(add: Callable[[], None], name: str) -> None:
    try:
        add()
    except (TypeError, ValueError) as exc:  # a conflicting or incomplete file
        log.warning("reflection: %s left out of its descriptor pool (%s)", name, exc)


class ReflectionV1Servicer(v1_grpc.ServerReflectionServicer):
    """grpc.reflection.v1 over grpcio-reflection's v1alpha servicer: the messages are
    wire-identical, so each one is re-read as the other version's."""

    def __init__(self, v1alpha_servicer: Any) -> None:
        self._v1alpha = v1alpha_servicer

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterator[v1_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[v1_pb2.ServerReflectionResponse]:
        async def as_v1alpha() -> AsyncIterator[v1alpha_pb2.ServerReflectionRequest]:
            async for request in request_iterator:
                yield v1alpha_pb2.ServerReflectionRequest.FromString(request.SerializeToString())

        async for response in self._v1alpha.ServerReflectionInfo(as_v1alpha(), context):
            yield v1_pb2.ServerReflectionResponse.FromString(response.SerializeToString())


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection v1 and v1alpha on `server`: both list `service_names` and
    themselves, and describe them with the protos' comments."""
    names = list(dict.fromkeys([*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]))
    servicer = v1alpha.aio.ReflectionServicer(names, pool=documented_pool(names))
    v1alpha_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_grpc.add_ServerReflectionServicer_to_server(ReflectionV1Servicer(servicer), server)
