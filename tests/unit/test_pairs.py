import numpy as np
import pytest

from attention_server.runtime.pairs import top_pairs


def _att(*heads):
    return np.array(heads, dtype=np.float32)[None]  # [1 layer, H, n, n]


def test_strongest_pairs_first_with_indices():
    head = [[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0]]
    table = top_pairs(_att(head), layers=[4], heads=[7], k=3)
    assert (table.layers.tolist(), table.heads.tolist()) == ([4], [7])
    assert table.head_pairs(0) == [(2, 2, 1.0), (0, 1, pytest.approx(0.9)), (1, 0, 0.5)]


def test_ties_break_by_from_then_to_index():
    head = np.full((2, 2), 0.5, dtype=np.float32)
    table = top_pairs(head[None, None], [0], [0], k=4)
    assert [(f, t) for f, t, _ in table.head_pairs(0)] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_k_larger_than_matrix_returns_every_cell():
    table = top_pairs(np.eye(3, dtype=np.float32)[None, None], [0], [0], k=100)
    assert table.counts.tolist() == [9]


def test_min_strength_and_excluded_tokens():
    head = [[0.6, 0.4, 0.0], [0.1, 0.7, 0.2], [0.3, 0.3, 0.4]]
    table = top_pairs(_att(head), [0], [0], k=9, min_strength=0.35, exclude=np.array([True, False, False]))
    # token 0 is excluded at both ends: 0.6, 0.4 (from 0) and 0.3 (to 0) go; 0.2 is below 0.35
    assert [(f, t) for f, t, _ in table.head_pairs(0)] == [(1, 1), (2, 2)]


def test_all_tokens_excluded_gives_empty_rows():
    table = top_pairs(np.ones((2, 3, 2, 2), np.float32) / 2, [0, 1], [0, 1, 2], k=3, exclude=np.array([True, True]))
    assert table.counts.tolist() == [0] * 6


@pytest.mark.parametrize("n", [3, 17, 40, 130])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_matches_a_full_sort_on_random_softmax_heads(n, k):
    rng = np.random.default_rng(n * 100 + k)
    logits = rng.normal(size=(2, 3, n, n)) * rng.uniform(0.5, 6)
    att = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    att = att.astype(np.float32)
    att[0, 1, :, 0] = 0.5  # a broadcast column: many exact ties
    exclude = rng.random(n) < 0.2
    table = top_pairs(att, layers=[1, 5], heads=[0, 2, 9], k=k, exclude=exclude)
    assert table.layers.tolist() == [1, 1, 1, 5, 5, 5] and table.heads.tolist() == [0, 2, 9, 0, 2, 9]
    keep = np.flatnonzero(~exclude)
    for row, matrix in enumerate(att.reshape(6, n, n)):
        cells = sorted((-float(matrix[f, t]), f, t) for f in keep for t in keep)[:k]
        assert [(f, t) for _, f, t in cells] == [(f, t) for f, t, _ in table.head_pairs(row)]
        assert np.allclose([-v for v, _, _ in cells], [s for _, _, s in table.head_pairs(row)])


@pytest.mark.parametrize("excluded", [[0, 39], [0, 17, 39], [0, 3, 9, 12, 20, 25, 30, 33, 36, 39], []])
def test_split_and_parallel_paths_give_the_same_tables(monkeypatch, excluded):
    """A view, block copies, the elementwise gather and threaded row maxima: one answer."""
    from attention_server.runtime import pairs

    rng = np.random.default_rng(len(excluded))
    logits = rng.normal(size=(3, 4, 40, 40)) * 3
    att = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    exclude = np.zeros(40, bool)
    exclude[excluded] = True
    expected = top_pairs(att, [0, 1, 2], [0, 1, 2, 3], k=7, exclude=exclude)
    monkeypatch.setattr(pairs, "PARALLEL_CELLS", 0)
    monkeypatch.setattr(pairs, "_workers", lambda: 3)
    threaded = top_pairs(att, [0, 1, 2], [0, 1, 2, 3], k=7, exclude=exclude)
    keep = np.flatnonzero(~exclude)
    for row, matrix in enumerate(att.reshape(12, 40, 40)):
        cells = sorted((-float(matrix[f, t]), f, t) for f in keep for t in keep)[:7]
        assert [(f, t) for _, f, t in cells] == [(f, t) for f, t, _ in expected.head_pairs(row)]
    for name in ("from_index", "to_index", "strength", "counts"):
        np.testing.assert_array_equal(getattr(expected, name), getattr(threaded, name))
