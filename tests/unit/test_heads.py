"""Head statistics, word-level attention and rollout on synthetic matrices with known answers."""

import numpy as np
import pytest

from attention_server.runtime.heads import STATISTICS, group_words, head_statistics, rollout, word_attention
from attention_server.runtime.types import Tokens


def _tokens(texts, words, special=None, ids=None):
    n = len(texts)
    special = np.array(special if special is not None else [t.startswith("[") for t in texts])
    return Tokens(
        ids=np.array(ids if ids is not None else range(200, 200 + n), dtype=np.int64),
        type_ids=np.zeros(n, np.int64), texts=texts,
        starts=np.full(n, -1, np.int32), ends=np.full(n, -1, np.int32),
        word_index=np.array(words, np.int32), special=special, segment=np.zeros(n, np.int32),
    )


TOKENS = _tokens(["[CLS]", "the", "transform", "##er", ".", "[SEP]"], [-1, 0, 1, 1, 2, -1], ids=[101, 1, 2, 3, 4, 102])


def stat(values, name):
    return values[..., STATISTICS.index(name)]


def test_split_word_is_one_unit():
    words = group_words(TOKENS)
    assert words.texts == ["[CLS]", "the", "transformer", ".", "[SEP]"]
    assert words.unit_of_token.tolist() == [0, 1, 2, 2, 3, 4]
    assert words.special.tolist() == [True, False, False, False, True]


def test_word_attention_sums_to_pieces_and_averages_from_pieces():
    rng = np.random.default_rng(0)
    att = rng.random((1, 1, 6, 6))
    att /= att.sum(-1, keepdims=True)
    w = word_attention(att, group_words(TOKENS))[0, 0]
    assert w.shape == (5, 5)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    a = att[0, 0]
    # from "the" (token 1) to "transformer" (tokens 2, 3): summed
    assert w[1, 2] == pytest.approx(a[1, 2] + a[1, 3], abs=1e-6)
    # from "transformer" to "the": averaged over the two pieces
    assert w[2, 1] == pytest.approx((a[2, 1] + a[3, 1]) / 2, abs=1e-6)
    # from "transformer" to itself: both pieces, both directions
    assert w[2, 2] == pytest.approx((a[2, 2] + a[2, 3] + a[3, 2] + a[3, 3]) / 2, abs=1e-6)


def test_statistics_of_known_patterns():
    n = 6
    identity = np.eye(n)
    uniform = np.full((n, n), 1 / n)
    previous = np.eye(n, k=-1)
    previous[0, 0] = 1.0  # the first token has no previous one
    to_sep = np.zeros((n, n))
    to_sep[:, 5] = 1.0
    att = np.stack([identity, uniform, previous, to_sep])[None]  # [1, 4, n, n]
    s = head_statistics(att, TOKENS, cls_id=101, sep_id=102)[0]
    assert stat(s[0], "entropy") == pytest.approx(0) and stat(s[0], "to_self") == pytest.approx(1)
    assert stat(s[0], "mean_distance") == pytest.approx(0)
    assert stat(s[1], "entropy") == pytest.approx(np.log(n), rel=1e-6)
    assert stat(s[1], "entropy_relative") == pytest.approx(1.0, rel=1e-6)
    assert stat(s[1], "to_cls") == pytest.approx(1 / n) and stat(s[1], "to_punctuation") == pytest.approx(1 / n)
    assert stat(s[2], "to_previous") == pytest.approx(1.0) and stat(s[2], "to_next") == pytest.approx(0.0)
    assert stat(s[2], "mean_distance") == pytest.approx(5 / 6)
    assert stat(s[3], "to_sep") == pytest.approx(1.0) and stat(s[3], "to_cls") == pytest.approx(0.0)


def test_rollout_matches_a_hand_computation():
    a1 = np.array([[1.0, 0.0], [0.5, 0.5]])
    a2 = np.array([[0.5, 0.5], [0.0, 1.0]])
    r = rollout(np.stack([a1, a2])[:, None])  # [L=2, H=1, 2, 2]
    np.testing.assert_allclose(r[0], [[1.0, 0.0], [0.25, 0.75]], atol=1e-7)
    np.testing.assert_allclose(r[1], [[0.8125, 0.1875], [0.25, 0.75]], atol=1e-7)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_rows_sum_to_one(fusion):
    rng = np.random.default_rng(1)
    att = rng.random((6, 12, 9, 9))
    att /= att.sum(-1, keepdims=True)
    r = rollout(att, fusion)
    assert r.shape == (6, 9, 9)
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-5)


def test_rollout_rejects_unknown_fusion():
    with pytest.raises(ValueError, match="fusion"):
        rollout(np.ones((1, 1, 2, 2)) / 2, "median")


def test_role_rules_first_match_and_families():
    from attention_server.runtime.roles import FAMILY, label

    base = dict.fromkeys(STATISTICS, 0.0) | {"entropy_relative": 0.5, "mean_distance": 5.0}
    assert label(base | {"to_previous": 0.9, "to_sep": 0.9}) == ("previous_token", 0.9)
    assert label(base | {"to_sep": 0.6}) == ("broadcast_sep", 0.6)
    assert label(base | {"entropy_relative": 0.8}) == ("broad", 0.8)
    assert label(base | {"mean_distance": 1.5}) == ("local", 1.5)
    assert label(base) == ("content", 0.5)
    assert {FAMILY[r] for r in ("previous_token", "local")} == {"positional"}
    assert FAMILY["content"] == "syntactic/semantic" and FAMILY["broad"] == "global"
