"""Pair strengths: the strongest (from token, to token) entries of each head.

Vectorized over all heads at once, and only candidates are sorted: for k up to
n, the k-th largest row maximum of a head is a lower bound of its k-th largest
entry (k rows each hold an entry at least that large), so entries below it can
never be in the top k (the same argument with each row's m-th largest entry
covers k > n).
"""

from __future__ import annotations

import numpy as np

from .types import PairTable


def top_pairs(
    attention: np.ndarray,
    layers: list[int],
    heads: list[int],
    k: int,
    min_strength: float = 0.0,
    exclude: np.ndarray | None = None,
) -> PairTable:
    """For attention [L, H, n, n] (rows: from, columns: to), the k largest entries
    of every head, strongest first (ties: lower from, then lower to index first).
    `exclude` is a bool [n] mask of tokens whose pairs are left out (either end);
    entries below `min_strength` are dropped (`counts` says how many remain)."""
    n_layers, n_heads, n, _ = attention.shape
    att = attention.reshape(n_layers * n_heads, n, n)
    keep_index = None
    if exclude is not None and exclude.any():
        keep_index = np.flatnonzero(~exclude)
        att = att[:, keep_index][:, :, keep_index]
    rows, size = att.shape[0], att.shape[1]
    layer_of = np.repeat(np.asarray(layers, dtype=np.int32), n_heads)
    head_of = np.tile(np.asarray(heads, dtype=np.int32), n_layers)
    kk = min(k, size * size)
    if kk == 0:
        empty = np.zeros((rows, 0), dtype=np.int32)
        return PairTable(layer_of, head_of, empty, empty.copy(), empty.astype(np.float32),
                         np.zeros(rows, dtype=np.int32))
    # Lower bound of each head's kk-th largest entry: with m = ceil(kk / size),
    # `need` rows whose m-th largest entry is >= bound hold >= kk entries >= bound.
    m = -(-kk // size)
    need = -(-kk // m)
    row_value = att.max(axis=2) if m == 1 else np.partition(att, size - m, axis=2)[:, :, size - m]
    bound = np.partition(row_value, size - need, axis=1)[:, size - need]
    h, f, t = np.nonzero(att >= bound[:, None, None])
    values = att[h, f, t].astype(np.float32, copy=False)
    flat = f.astype(np.int64) * size + t
    order = np.lexsort((flat, -values, h))
    h, flat, values = h[order], flat[order], values[order]
    starts = np.searchsorted(h, np.arange(rows))
    take = starts[:, None] + np.arange(kk)[None, :]  # every head has >= kk candidates
    flat, strength = flat[take], values[take]
    from_index, to_index = flat // size, flat % size
    if keep_index is not None:
        from_index, to_index = keep_index[from_index], keep_index[to_index]
    counts = (strength >= min_strength).sum(axis=1).astype(np.int32)  # strongest first: a prefix
    return PairTable(layer_of, head_of, from_index.astype(np.int32), to_index.astype(np.int32),
                     strength.astype(np.float32), counts)
