"""Client SDK for the attention service: per-head attention weights, hidden
states and pair strengths of a transformer, over gRPC.

    from attention_client import AttentionClient
    with AttentionClient("localhost:50051", timeout=30) as client:
        result = client.analyze("The transformer model processes all tokens.", top_k=3)
        result.attention      # numpy [layers, heads, seq, seq]
        result.pair_rows()    # (layer, head, from, to, strength)
"""

from ._client import AttentionClient
from .aio import AsyncAttentionClient
from .errors import AttentionError
from .memory import tune_malloc
from .results import AnalyzeResult, Head, HeadPairs, ModelInfo, Pair, Token, Word

__all__ = [
    "AnalyzeResult",
    "AsyncAttentionClient",
    "AttentionClient",
    "AttentionError",
    "Head",
    "HeadPairs",
    "ModelInfo",
    "Pair",
    "Token",
    "Word",
    "tune_malloc",
]
__version__ = "0.1.0"
