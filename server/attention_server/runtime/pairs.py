"""Pair strengths: the strongest (from token, to token) entries of each head.

Vectorized over all heads at once, and only candidates are sorted: for k up to
n, the k-th largest row maximum of a head is a lower bound of its k-th largest
entry (k rows each hold an entry at least that large), so entries below it can
never be in the top k (the same argument with each row's m-th largest entry
covers k > n). An entry at or above the bound lies in a row whose maximum is at
or above it, so only those rows (a few per head) are scanned for candidates:
one pass over the matrices (the row maxima) instead of three.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .types import PairTable

# Excluded tokens that split the kept ones into more runs than this are left out by
# fancy indexing (one gather per element); fewer runs are copied block by block.
MAX_BLOCK_RUNS = 8
# Matrices of more cells than this have their row maxima (one pass over every cell, the
# bulk of the work) taken in one thread per core, heads split between them: numpy
# releases the GIL there. A 512-token sequence has 18.9 M cells.
PARALLEL_CELLS = 4 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _row_max(att: np.ndarray) -> np.ndarray:
    """att.max(axis=2), split over the cores for large matrices (the same numbers)."""
    workers = min(_workers(), att.shape[0])
    if att.size <= PARALLEL_CELLS or workers < 2:
        whole: np.ndarray = att.max(axis=2)
        return whole
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pairs")
    bounds = np.linspace(0, att.shape[0], workers + 1).astype(int).tolist()
    chunks = [_pool.submit(np.max, att[a:b], axis=2) for a, b in itertools.pairwise(bounds)]
    return np.concatenate([c.result() for c in chunks])


def _runs(keep: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive indices in the sorted `keep`."""
    breaks = np.flatnonzero(np.diff(keep) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [keep.size]])
    return [(int(keep[a]), int(keep[b - 1]) + 1) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def _kept(att: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """att[:, keep][:, :, keep] for [heads, n, n]: a view when the kept tokens are
    consecutive ([CLS] and a final [SEP] left out), block copies for a few runs
    (a text pair's middle [SEP]); the elementwise gather only for many runs."""
    runs = _runs(keep)
    if len(runs) == 1:
        a, b = runs[0]
        return att[:, a:b, a:b]
    if len(runs) > MAX_BLOCK_RUNS:
        return att[:, keep][:, :, keep]
    out = np.empty((att.shape[0], keep.size, keep.size), dtype=att.dtype)
    i = 0
    for a, b in runs:
        j = 0
        for c, d in runs:
            out[:, i:i + b - a, j:j + d - c] = att[:, a:b, c:d]
            j += d - c
        i += b - a
    return out


def top_pairs(
    attention: np.ndarray,
    layers: list[int],
    heads: list[int],
    k: int,
    min_strength: float = 0.0,
    exclude: np.ndarray | None = None,
    causal: bool = False,
) -> PairTable:
    """For attention [L, H, n, n] (rows: from, columns: to), the k largest entries
    of every head, strongest first (ties: lower from, then lower to index first).
    `exclude` is a bool [n] mask of tokens whose pairs are left out (either end);
    entries below `min_strength` are dropped (`counts` says how many remain).
    `causal`: the first token can attend only to itself (always 1.0), so pairs *from*
    it say nothing and are left out; pairs *to* it (the attention sink) are kept; pairs
    to later tokens (masked, 0) do not exist and are never returned, however large k."""
    n_layers, n_heads, n, _ = attention.shape
    att = attention.reshape(n_layers * n_heads, n, n)
    keep_index = None
    if exclude is not None and exclude.any():
        keep_index = np.flatnonzero(~exclude)
        att = _kept(att, keep_index) if keep_index.size else att[:, :0, :0]
    rows, size = att.shape[0], att.shape[1]
    layer_of = np.repeat(np.asarray(layers, dtype=np.int32), n_heads)
    head_of = np.tile(np.asarray(heads, dtype=np.int32), n_layers)
    skip = 1 if causal and size and (keep_index is None or keep_index[0] == 0) else 0
    from_rows = size - skip  # rows whose pairs can be returned
    # A causal row i has pairs to 0..i only (kept tokens stay in order): the masked future is no pair.
    kk = min(k, size * (size + 1) // 2 - skip if causal else from_rows * size)
    if kk == 0:
        empty = np.zeros((rows, 0), dtype=np.int32)
        return PairTable(layer_of, head_of, empty, empty.copy(), empty.astype(np.float32),
                         np.zeros(rows, dtype=np.int32))
    # Lower bound of each head's kk-th largest entry: with m = ceil(kk / from_rows),
    # `need` rows whose m-th largest entry is >= bound hold >= kk entries >= bound.
    m = -(-kk // from_rows)
    need = -(-kk // m)
    row_max = _row_max(att)
    row_value = row_max if m == 1 else np.partition(att, size - m, axis=2)[:, :, size - m]
    if skip:  # below every probability: never a candidate row, never the bound (need <= from_rows)
        row_max = row_max.copy()
        row_max[:, 0] = -1.0
        if m == 1:
            row_value = row_max
        else:
            row_value[:, 0] = -1.0
    bound = np.partition(row_value, size - need, axis=1)[:, size - need]
    # Every entry >= bound is in a row whose maximum is >= bound: scan those rows only.
    cand_h, cand_f = np.nonzero(row_max >= bound[:, None])
    candidates = att[cand_h, cand_f]  # [candidate rows, size]
    if causal:  # the future is never a candidate, even where a real probability underflowed to 0 too
        candidates = np.where(np.arange(size)[None, :] > cand_f[:, None], -1.0, candidates)
    c, t = np.nonzero(candidates >= bound[cand_h][:, None])
    h, f = cand_h[c], cand_f[c]
    values = candidates[c, t].astype(np.float32, copy=False)
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
