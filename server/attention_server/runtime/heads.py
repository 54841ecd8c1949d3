"""What heads do: word-level attention, per-head statistics, attention rollout.

All functions take attention A of shape [L, H, n, n] (row i: where token i
attends; rows sum to 1) for one sequence and return numpy arrays.

Word level (Clark et al. 2019, "What does BERT look at?"): attention *to* a word
split into pieces is the sum over its pieces (columns summed), attention *from*
it is the mean over its pieces (rows averaged), so rows still sum to 1. Special
tokens stay units of their own.

Head statistics, each averaged over the n rows (every token, special ones too):

    entropy            H = mean_i( -sum_j A_ij ln A_ij )                    (nats)
    entropy_relative   H / ln n   (1: uniform over all tokens, 0: one token; causal models:
                       mean_{i>0}( H_i / ln(i+1) ), uniform over the tokens row i can see)
    mean_distance      mean_i( sum_j A_ij |i - j| )                         (tokens)
    to_cls / to_sep    mean_i( sum_{j special [CLS] / [SEP]} A_ij )
    to_punctuation     mean_i( sum_{j punctuation} A_ij )
    to_previous        mean_{i>0}( A_{i,i-1} ),  to_next  mean_{i<n-1}( A_{i,i+1} )
    to_self            mean_i( A_ii )

Rollout (Abnar & Zuidema 2020): per layer fuse the heads (mean, max or min),
add the identity for the residual path and renormalise the rows,
    Â_l = rownorm( fuse(A_l) + I ),
then multiply through the layers: R_1 = Â_1, R_l = Â_l R_{l-1}. Row i of R_L
says how much each input token flows into position i at the last layer.
"""

from __future__ import annotations

import unicodedata

import numpy as np

from .types import Tokens, Words

STATISTICS = ("entropy", "entropy_relative", "mean_distance", "to_cls", "to_sep", "to_punctuation",
              "to_previous", "to_next", "to_self")
FUSIONS = ("mean", "max", "min")


def group_words(tokens: Tokens, prefix: str = "##", word_start: str | None = None) -> Words:
    """Consecutive tokens with the same (segment, word index) form a word. Its text joins the
    pieces without the continuation `prefix` (WordPiece "##") or, in byte-level / sentencepiece
    vocabularies, without the `word_start` marker of its first piece ("Ġ", "▁")."""
    n = len(tokens)
    unit = np.empty(n, dtype=np.int32)
    bounds: list[int] = []
    previous: tuple[int, int] | None = None
    for k in range(n):
        key = (int(tokens.segment[k]), int(tokens.word_index[k]))
        if tokens.special[k] or tokens.word_index[k] < 0 or key != previous:
            bounds.append(k)
        previous = None if tokens.special[k] else key
        unit[k] = len(bounds) - 1
    starts_tok = np.array(bounds, dtype=np.int32)
    ends_tok = np.append(starts_tok[1:], n).astype(np.int32)
    texts = []
    for a, b in zip(starts_tok.tolist(), ends_tok.tolist(), strict=True):
        pieces = tokens.texts[a:b]
        text = pieces[0] + "".join(p.removeprefix(prefix) if prefix else p for p in pieces[1:])
        if word_start and not tokens.special[a]:
            text = text.removeprefix(word_start) or text
        texts.append(text)
    return Words(
        texts=texts, token_start=starts_tok, token_end=ends_tok,
        starts=tokens.starts[starts_tok], ends=tokens.ends[ends_tok - 1],
        special=tokens.special[starts_tok], segment=tokens.segment[starts_tok], unit_of_token=unit,
    )


def word_attention(attention: np.ndarray, words: Words) -> np.ndarray:
    """[L, H, n, n] token attention -> [L, H, w, w]: columns summed over a word's
    pieces, rows averaged over them."""
    n, w = attention.shape[-1], len(words)
    member = np.zeros((n, w), dtype=np.float32)  # token -> unit indicator
    member[np.arange(n), words.unit_of_token] = 1.0
    sizes = member.sum(axis=0)
    to_words = attention.astype(np.float32, copy=False) @ member  # [L, H, n, w]: summed over pieces
    words_to_words: np.ndarray = np.einsum("nw,lhnv->lhwv", member / sizes, to_words, optimize=True)
    return words_to_words


def punctuation_mask(texts: list[str]) -> np.ndarray:
    return np.array([bool(t) and all(unicodedata.category(c).startswith("P") for c in t) for t in texts])


def head_statistics(attention: np.ndarray, tokens: Tokens, cls_id: int | None, sep_id: int | None,
                    causal: bool = False) -> np.ndarray:
    """[L, H, len(STATISTICS)] in the order of STATISTICS (formulas above). For a causal
    model row i can only reach tokens 0..i: entropy_relative divides each row's entropy by
    ln(i + 1) (rows i >= 1), so 1 still means uniform over what the token can see."""
    att = attention.astype(np.float64)
    n = att.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(att > 0, att * np.log(att), 0.0)
    row_entropy = -plogp.sum(-1)
    entropy = row_entropy.mean(-1)
    if n <= 1:
        relative = np.zeros_like(entropy)
    elif causal:
        relative = (row_entropy[..., 1:] / np.log(np.arange(2, n + 1))).mean(-1)
    else:
        relative = entropy / np.log(n)
    idx = np.arange(n)
    distance = (att * np.abs(idx[:, None] - idx[None, :])).sum(-1).mean(-1)
    ids = tokens.ids

    def share(mask: np.ndarray) -> np.ndarray:
        return att[..., mask].sum(-1).mean(-1) if mask.any() else np.zeros(att.shape[:2])

    to_cls = share(tokens.special & (ids == cls_id)) if cls_id is not None else np.zeros(att.shape[:2])
    to_sep = share(tokens.special & (ids == sep_id)) if sep_id is not None else np.zeros(att.shape[:2])
    to_punct = share(punctuation_mask(tokens.texts) & ~tokens.special)
    diag = np.diagonal(att, axis1=-2, axis2=-1)
    previous = np.diagonal(att, offset=-1, axis1=-2, axis2=-1).mean(-1) if n > 1 else np.zeros(att.shape[:2])
    following = np.diagonal(att, offset=1, axis1=-2, axis2=-1).mean(-1) if n > 1 else np.zeros(att.shape[:2])
    return np.stack([entropy, relative, distance, to_cls, to_sep, to_punct, previous, following,
                     diag.mean(-1)], axis=-1).astype(np.float32)


def rollout(attention: np.ndarray, fusion: str = "mean") -> np.ndarray:
    """[L, H, n, n] -> [L, n, n]: entry l is the rollout through layers 0..l."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    fused = getattr(attention.astype(np.float64), fusion)(axis=1)  # [L, n, n]
    n = fused.shape[-1]
    fused = fused + np.eye(n)
    fused /= fused.sum(-1, keepdims=True)
    out = np.empty_like(fused)
    current = np.eye(n)
    for layer in range(fused.shape[0]):
        current = fused[layer] @ current
        out[layer] = current
    rollout: np.ndarray = out.astype(np.float32)
    return rollout
