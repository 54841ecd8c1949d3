import numpy as np

from attention_server.runtime.pairs import top_pairs


def _att(*heads):
    return np.array(heads, dtype=np.float32)[None]  # [1 layer, H, n, n]


def test_strongest_pairs_first_with_indices():
    head = [[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0]]
    [pairs] = top_pairs(_att(head), layers=[4], heads=[7], k=3)
    assert (pairs.layer, pairs.head) == (4, 7)
    assert list(zip(pairs.from_index.tolist(), pairs.to_index.tolist(), strict=True)) == [(2, 2), (0, 1), (1, 0)]
    np.testing.assert_allclose(pairs.strength, [1.0, 0.9, 0.5])


def test_ties_break_by_from_then_to_index():
    head = np.full((2, 2), 0.5, dtype=np.float32)
    [pairs] = top_pairs(head[None, None], [0], [0], k=4)
    cells = list(zip(pairs.from_index.tolist(), pairs.to_index.tolist(), strict=True))
    assert cells == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_k_larger_than_matrix_returns_every_cell():
    [pairs] = top_pairs(np.eye(3, dtype=np.float32)[None, None], [0], [0], k=100)
    assert len(pairs.strength) == 9


def test_min_strength_and_excluded_tokens():
    head = [[0.6, 0.4, 0.0], [0.1, 0.7, 0.2], [0.3, 0.3, 0.4]]
    [pairs] = top_pairs(_att(head), [0], [0], k=9, min_strength=0.35, exclude=np.array([True, False, False]))
    # token 0 is excluded at both ends: 0.6, 0.4 (from 0) and 0.3 (to 0) go
    assert list(zip(pairs.from_index.tolist(), pairs.to_index.tolist(), strict=True)) == [(1, 1), (2, 2)]


def test_one_entry_per_head_layer_major():
    att = np.random.default_rng(0).random((2, 3, 4, 4)).astype(np.float32)
    result = top_pairs(att, layers=[1, 5], heads=[0, 2, 9], k=2)
    assert [(p.layer, p.head) for p in result] == [(1, 0), (1, 2), (1, 9), (5, 0), (5, 2), (5, 9)]
    for p, matrix in zip(result, att.reshape(6, 4, 4), strict=True):
        np.testing.assert_allclose(p.strength, np.sort(matrix.ravel())[::-1][:2])
        np.testing.assert_allclose(matrix[p.from_index, p.to_index], p.strength)
