"""Word-level view, head statistics and rollout through the real service agree
with the same maths applied to the returned token matrices."""

import grpc
import numpy as np
import pytest

from attention_client import AttentionError, InvalidArgumentError
from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client._proto.attention.v1 import attention_pb2_grpc as pb_grpc

SENTENCE = "The transformer model processes all tokens in parallel using multi-head attention."


@pytest.fixture(scope="module")
def result(client):
    return client.analyze(SENTENCE, top_k=2, word_level=True, head_statistics=True, rollout="mean")


def test_split_words_come_back_as_one_word(result):
    texts = [w.text for w in result.words]
    assert texts[:4] == ["[CLS]", "the", "transformer", "model"] and texts[-1] == "[SEP]"
    word = result.words[2]
    assert [t.text for t in result.tokens[word.first_token:word.end_token]] == ["transform", "##er"]
    assert SENTENCE[word.start:word.end] == "transformer"


def test_word_attention_is_pieces_summed_to_and_averaged_from(result):
    att, words = result.attention, result.words
    assert result.word_attention.shape == (6, 12, len(words), len(words))
    np.testing.assert_allclose(result.word_attention.sum(-1), 1.0, atol=1e-5)
    t = words[2]  # "transformer" = tokens 2, 3
    m = words[3]  # "model" = token 4
    np.testing.assert_allclose(result.word_attention[:, :, 3, 2], att[:, :, 4, 2] + att[:, :, 4, 3], atol=1e-6)
    np.testing.assert_allclose(result.word_attention[:, :, 2, 3], att[:, :, 2:4, 4].mean(-1), atol=1e-6)
    assert (t.first_token, t.end_token, m.first_token) == (2, 4, 4)


def test_word_pairs_name_words_with_one_strength(result):
    rows = result.word_pair_rows()
    assert len(result.word_pairs) == 72 and all(len(hp.pairs) == 2 for hp in result.word_pairs)
    assert all(a != "##er" and b != "##er" for _, _, a, b, _ in rows)
    for hp in result.word_pairs:
        matrix = result.word_attention[hp.layer, hp.head]
        assert [p.strength for p in hp.pairs] == pytest.approx(np.sort(matrix.ravel())[::-1][:2].tolist(), abs=1e-6)


def test_head_statistics_match_the_returned_matrices(result):
    stats = {(h.layer, h.index): h.statistics for h in result.head_statistics}
    assert len(stats) == 72
    att = result.attention.astype(np.float64)
    n = att.shape[-1]
    for (layer, head), s in stats.items():
        a = att[layer, head]
        assert s["to_self"] == pytest.approx(np.diag(a).mean(), abs=1e-5)
        assert s["to_previous"] == pytest.approx(np.diag(a, -1).mean(), abs=1e-5)
        assert s["to_cls"] == pytest.approx(a[:, 0].mean(), abs=1e-5)
        assert s["to_sep"] == pytest.approx(a[:, n - 1].mean(), abs=1e-5)
        assert 0 <= s["entropy_relative"] <= 1 + 1e-6
    # layer 0, head 2 of this model attends to the previous token
    assert stats[(0, 2)]["to_previous"] > 0.9


def test_rollout_matches_a_computation_from_the_matrices(result):
    fused = result.attention.astype(np.float64).mean(axis=1) + np.eye(result.attention.shape[-1])
    fused /= fused.sum(-1, keepdims=True)
    expected = fused[0]
    for layer in range(1, 6):
        expected = fused[layer] @ expected
    assert result.rollout.shape == (6, fused.shape[-1], fused.shape[-1])
    np.testing.assert_allclose(result.rollout[-1], expected, atol=1e-5)
    np.testing.assert_allclose(result.rollout.sum(-1), 1.0, atol=1e-5)


def test_views_without_matrices_and_bad_fusion(server, client):
    light = client.analyze(SENTENCE, word_level=True, top_k=1, attention=False, hidden_states=False)
    assert light.word_attention is None and light.attention is None and len(light.word_pairs) == 72
    with pytest.raises(InvalidArgumentError, match=r"options\.rollout: 'median' is not a fusion"):
        client.analyze(SENTENCE, rollout="median")  # type: ignore[arg-type]  # refused before the call
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.AttentionServiceStub(channel).Analyze(
            pb.AnalyzeRequest(sequences=[pb.Sequence(text="x")], options=pb.AnalyzeOptions(rollout=9)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "options.rollout" in err.value.details()
    with pytest.raises(AttentionError):
        client.analyze("")


def test_model_heads_carry_roles_from_the_probe_corpus(client):
    from attention_server.runtime.roles import FAMILY, RULES

    info = client.get_model()
    assert len(info.heads) == 72 and all(h.role in FAMILY for h in info.heads)
    deciding = {role: stat for role, stat, _, _ in RULES}
    for h in info.heads:
        assert h.family == FAMILY[h.role]
        stat = deciding.get(h.role, "entropy_relative")
        assert h.role_score == pytest.approx(h.statistics[stat], abs=1e-4)
    roles = {(h.layer, h.index): h.role for h in info.heads}
    assert roles[(0, 2)] == "previous_token"  # measured on this model, as in the per-sentence statistics


def test_cli_prints_word_pairs_with_roles(server):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "attention_client.cli", "--target", server.target, "analyze",
                           SENTENCE, "--words", "--top-k", "1", "--layers", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["layer", "head", "role", "from", "to", "strength"]
    rows = [line.split() for line in lines[1:13]]
    assert rows[2][:3] == ["0", "2", "previous_token"]
    assert "transformer" in done.stdout and "##er" not in done.stdout
