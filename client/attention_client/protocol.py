"""The attention.v1 wire contract, public: the generated messages and service stubs
of proto/attention/v1/attention.proto and the one dtype table for its Tensors.

Other programs (the server among them) import the contract from here, never from
the SDK's private modules; the generated code itself stays in `_proto` so that
`make proto` can rewrite it.
"""

from __future__ import annotations

from ._proto.attention.v1 import attention_pb2, attention_pb2_grpc
from .tensors import DTYPES, TensorError, dtype_code

SERVICE_NAME: str = attention_pb2.DESCRIPTOR.services_by_name["AttentionService"].full_name

__all__ = ["DTYPES", "SERVICE_NAME", "TensorError", "attention_pb2", "attention_pb2_grpc", "dtype_code"]
