"""Client SDK for the attention service: per-head attention weights, hidden
states and pair strengths of a transformer, over gRPC.

    from attention_client import AttentionClient
    with AttentionClient("localhost:50051", timeout=30) as client:
        result = client.analyze("The transformer model processes all tokens.", top_k=3)
        result.attention      # numpy [layers, heads, seq, seq]
        result.pair_rows()    # (layer, head, from, to, strength)
        results = client.analyze_batch(["one text", "another"], top_k=1)   # a list, in order

Every failure is an AttentionError subclass (InvalidArgumentError, UnavailableError, ...)
with `.code`, `.details`, `.request_id` and `.retryable`.
"""

from ._client import AttentionClient
from ._request import AttentionDType, Fusion, SequenceInput, TokenIds
from .aio import AsyncAttentionClient
from .errors import (
    AbortedError,
    AlreadyExistsError,
    AttentionError,
    CallCancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from .memory import tune_malloc
from .results import AnalyzeResult, FloatArray, Head, HeadPairs, ModelInfo, Pair, Token, Word

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "AnalyzeResult",
    "AsyncAttentionClient",
    "AttentionClient",
    "AttentionDType",
    "AttentionError",
    "CallCancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FloatArray",
    "Fusion",
    "Head",
    "HeadPairs",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "OutOfRangeError",
    "Pair",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SequenceInput",
    "Token",
    "TokenIds",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "Word",
    "tune_malloc",
]
__version__ = "0.1.0"
