"""Pairs of a causal model: the first token can only attend to itself (always 1.0), so pairs
from it are left out; pairs to it (the attention sink of decoders) are kept."""

import numpy as np
import pytest

from attention_server.runtime.pairs import top_pairs


def _causal(rng: np.random.Generator, n: int) -> np.ndarray:
    logits = rng.normal(size=(2, 3, n, n)) * 3
    logits[..., np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] = -np.inf
    att = np.exp(logits - logits.max(-1, keepdims=True))
    return (att / att.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 5, 33])
@pytest.mark.parametrize("k", [1, 4, 2000])
@pytest.mark.parametrize("exclude_first", [False, True])
def test_matches_a_full_sort_without_the_first_tokens_row(n, k, exclude_first):
    rng = np.random.default_rng(n * 10 + k)
    att = _causal(rng, n)
    exclude = np.zeros(n, bool)
    exclude[0] = exclude_first  # e.g. Llama's <s> left out as a special token
    table = top_pairs(att, [0, 1], [0, 1, 2], k=k, exclude=exclude, causal=True)
    keep = np.flatnonzero(~exclude)
    first = 0 if not exclude_first else None  # an excluded first token is gone at both ends anyway
    for row, matrix in enumerate(att.reshape(6, n, n)):
        # Pairs to later tokens are masked, not pairs (before: k=2000 returned them with strength 0).
        cells = sorted((-float(matrix[f, t]), f, t) for f in keep for t in keep if f != first and t <= f)[:k]
        got = table.head_pairs(row)
        assert [(f, t) for _, f, t in cells] == [(f, t) for f, t, _ in got]
        assert np.allclose([-v for v, _, _ in cells], [s for _, _, s in got])


def test_the_first_token_still_receives_attention():
    att = np.array([[[[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.8, 0.1, 0.1]]]], dtype=np.float32)
    assert top_pairs(att, [0], [0], k=2).head_pairs(0)[0] == (0, 0, 1.0)  # an encoder view keeps it
    assert top_pairs(att, [0], [0], k=2, causal=True).head_pairs(0) == [
        (1, 0, pytest.approx(0.9)), (2, 0, pytest.approx(0.8))]


def test_a_large_k_never_returns_the_masked_future_even_where_attention_underflowed():
    """A row whose real attention underflowed to 0 still gets no pair to a later token; the
    reply has at most the pairs that exist: n(n+1)/2 - 1 (the first token's row left out)."""
    att = np.array([[[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]]], dtype=np.float32)
    got = top_pairs(att, [0], [0], k=9, causal=True).head_pairs(0)
    assert len(got) == 5 and all(t <= f for f, t, _ in got)
    assert [(f, t) for f, t, _ in got] == [(1, 0), (2, 0), (2, 1), (1, 1), (2, 2)]
