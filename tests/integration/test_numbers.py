"""The service's numbers against an independent computation (eager PyTorch)."""

import numpy as np
import pytest

from tests.reference import hf_tokenize, reference

SENTENCES = [
    "The transformer model processes all tokens in parallel using multi-head attention.",
    "Short.",
    "Different heads learn different relations: syntactic, semantic, positional and global ones.",
    "Attention weights are softmax probabilities, so every row of a head's matrix sums to one.",
    "ok",
]
TOL = 1e-4


@pytest.fixture(scope="module")
def batch(client):
    return client.analyze_batch(SENTENCES, top_k=5)


def test_tokens_match_the_source_tokenizer(batch):
    for text, result in zip(SENTENCES, batch, strict=True):
        assert [t.id for t in result.tokens] == hf_tokenize(text)
        assert result.tokens[0].special and result.tokens[-1].special
        for t in result.tokens[1:-1]:
            assert not t.special and 0 <= t.start < t.end <= len(text)
            piece = text[t.start:t.end].lower()
            assert piece == t.text.removeprefix("##")


def test_batched_attention_and_hidden_states_equal_the_reference(batch):
    assert len({len(r.tokens) for r in batch}) > 3  # really different lengths in one batch
    for result in batch:
        n = len(result.tokens)
        hidden, attention = reference([t.id for t in result.tokens])
        assert result.attention.shape == (6, 12, n, n)  # cut to its own length
        assert result.hidden_states.shape == (n, 384)
        np.testing.assert_allclose(result.attention, attention, atol=TOL, rtol=0)
        np.testing.assert_allclose(result.hidden_states, hidden, atol=TOL, rtol=0)


def test_every_row_sums_to_one(batch):
    for result in batch:
        np.testing.assert_allclose(result.attention.sum(axis=-1), 1.0, atol=1e-5)
        assert (result.attention >= 0).all()


def test_pairs_are_the_strongest_cells_of_each_head(batch):
    for result in batch:
        assert [(hp.layer, hp.head) for hp in result.pairs] == [(layer, h) for layer in range(6) for h in range(12)]
        for hp in result.pairs:
            matrix = result.attention[hp.layer, hp.head]
            strengths = [p.strength for p in hp.pairs]
            assert len(strengths) == min(5, matrix.size)
            np.testing.assert_allclose(strengths, np.sort(matrix.ravel())[::-1][: len(strengths)], atol=1e-6)
            for p in hp.pairs:
                assert matrix[p.from_index, p.to_index] == pytest.approx(p.strength, abs=1e-6)


def test_long_text_is_served_whole_not_truncated(client):
    text = " ".join(f"word{i} is followed by" for i in range(75))
    ids = hf_tokenize(text)
    assert 300 <= len(ids) <= 512
    result = client.analyze(text, top_k=1)
    assert [t.id for t in result.tokens] == ids  # > 128: the shipped tokenizer's truncation is off
    hidden, attention = reference(ids)
    np.testing.assert_allclose(result.attention, attention, atol=TOL, rtol=0)
    np.testing.assert_allclose(result.hidden_states, hidden, atol=TOL, rtol=0)


def test_exactly_max_positions_is_accepted(client):
    ids = [101] + [7592] * 510 + [102]
    result = client.analyze(ids, attention=False, top_k=1)
    assert len(result.tokens) == 512 and result.hidden_states.shape == (512, 384)


def test_token_ids_and_text_give_the_same_numbers(client):
    text = SENTENCES[0]
    by_text = client.analyze(text)
    by_ids = client.analyze([t.id for t in by_text.tokens])
    np.testing.assert_array_equal(by_ids.attention, by_text.attention)
    assert [t.text for t in by_ids.tokens] == [t.text for t in by_text.tokens]
    # words follow WordPiece continuation: "transform ##er" is one word
    words = {t.text: t.word_index for t in by_ids.tokens}
    assert words["transform"] == words["##er"]
    assert [t.word_index for t in by_ids.tokens] == [t.word_index for t in by_text.tokens]


def test_sentence_pairs_use_segments(client):
    result = client.analyze("Where is the cat?", text_pair="The cat sits on the mat.")
    ids = hf_tokenize("Where is the cat?", "The cat sits on the mat.")
    assert [t.id for t in result.tokens] == ids
    segments = [t.segment for t in result.tokens]
    assert segments[0] == 0 and segments[-1] == 1 and set(segments) == {0, 1}
    _, attention = reference(ids, segments)
    np.testing.assert_allclose(result.attention, attention, atol=TOL, rtol=0)


def test_layer_and_head_selection_and_float16(client):
    full = client.analyze(SENTENCES[2])
    part = client.analyze(SENTENCES[2], layers=[5, 1], heads=[3, 0, 11], attention_dtype="float16",
                          hidden_states=False, top_k=2)
    assert part.layers == [5, 1] and part.heads == [3, 0, 11]
    assert part.attention.dtype == np.float16 and part.hidden_states is None
    expected = full.attention[[5, 1]][:, [3, 0, 11]]
    np.testing.assert_allclose(part.attention.astype(np.float32), expected, atol=1e-3)
    assert [(hp.layer, hp.head) for hp in part.pairs] == [(5, 3), (5, 0), (5, 11), (1, 3), (1, 0), (1, 11)]
    np.testing.assert_allclose(part.head_attention(1, 11).astype(np.float32), full.head_attention(1, 11), atol=1e-3)


def test_pairs_only_request_carries_no_matrices(client):
    result = client.analyze(SENTENCES[0], top_k=3, attention=False, hidden_states=False,
                            exclude_special_tokens=True, min_strength=0.2)
    assert result.attention is None and result.hidden_states is None
    special = {i for i, t in enumerate(result.tokens) if t.special}
    for hp in result.pairs:
        assert len(hp.pairs) <= 3
        for p in hp.pairs:
            assert p.strength >= 0.2 and p.from_index not in special and p.to_index not in special


def test_stream_gives_the_same_numbers_as_unary(client):
    unary = client.analyze_batch(SENTENCES, top_k=2, ids=[f"s{i}" for i in range(len(SENTENCES))])
    streamed = list(client.analyze_stream(SENTENCES, top_k=2, ids=[f"s{i}" for i in range(len(SENTENCES))]))
    assert [r.index for r in streamed] == list(range(len(SENTENCES)))
    assert [r.id for r in streamed] == [f"s{i}" for i in range(len(SENTENCES))]
    for a, b in zip(unary, streamed, strict=True):
        assert a.tokens == b.tokens and a.pairs == b.pairs
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-6)
        np.testing.assert_allclose(a.hidden_states, b.hidden_states, atol=1e-5)
