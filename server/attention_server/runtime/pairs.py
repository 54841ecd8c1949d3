"""Pair strengths: the strongest (from token, to token) entries of each head."""

from __future__ import annotations

import numpy as np

from .types import HeadPairs


def top_pairs(
    attention: np.ndarray,
    layers: list[int],
    heads: list[int],
    k: int,
    min_strength: float = 0.0,
    exclude: np.ndarray | None = None,
) -> list[HeadPairs]:
    """For attention [L, H, n, n] (rows: from, columns: to), the k largest entries
    of every head, strongest first (ties: lower from, then lower to index first).
    `exclude` is a bool [n] mask of tokens whose pairs are left out (either end)."""
    n_layers, n_heads, n, _ = attention.shape
    flat = attention.reshape(n_layers * n_heads, n * n).astype(np.float32, copy=True)
    if exclude is not None and exclude.any():
        blocked = exclude[:, None] | exclude[None, :]
        flat[:, blocked.reshape(-1)] = -np.inf
    k = min(k, n * n)
    if k < n * n:
        part = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n * n), (flat.shape[0], n * n))
    values = np.take_along_axis(flat, part, axis=1)
    # Sort by strength descending, then by flat index ascending (stable order).
    order = np.lexsort((part, -values), axis=1)
    part = np.take_along_axis(part, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    out = []
    for row in range(flat.shape[0]):
        keep = np.isfinite(values[row]) & (values[row] >= min_strength)
        idx = part[row][keep]
        out.append(HeadPairs(
            layer=layers[row // n_heads],
            head=heads[row % n_heads],
            from_index=(idx // n).astype(np.int32),
            to_index=(idx % n).astype(np.int32),
            strength=values[row][keep].astype(np.float32),
        ))
    return out
