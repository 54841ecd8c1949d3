"""Head roles: each head's dominant pattern, from its statistics averaged over a
probe corpus (400 sentences shipped in attention_server/data), computed when a
model is exported or first loaded and stored next to it as roles.json.

Rules, first match wins (statistics as defined in heads.py):

    previous_token   to_previous >= 0.5
    next_token       to_next >= 0.5
    self             to_self >= 0.5
    broadcast_sep    to_sep >= 0.5
    broadcast_cls    to_cls >= 0.5
    broad            entropy_relative >= 0.75      (spread over the whole sequence)
    local            mean_distance <= 2.0          (within a couple of tokens)
    content          otherwise                     (depends on what the tokens are)

A causal model (a decoder: token i sees tokens 0..i only) is never labelled
next_token (LOOKS_AHEAD), and its entropy_relative is taken over what each token
can see (heads.py). Decoders without [CLS]/[SEP] have to_cls = to_sep = 0.

Families: previous_token, next_token, self and local are *positional*;
broadcast_sep, broadcast_cls and broad are *global context* (broadcast heads
often act as a no-op, Clark et al. 2019); content heads are *syntactic or
semantic*. Attention statistics alone cannot tell syntax from meaning: that
needs labelled probes (e.g. dependency arcs), which the service does not ship.
The positional and broadcast labels restate what the statistics measure and are
reliable; the score is the statistic that decided the label.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import numpy as np

from .heads import STATISTICS, head_statistics
from .onnx_model import pad_batch
from .types import HeadRole, ModelMetadata, Runtime, Tokenizer

log = logging.getLogger(__name__)

ROLES_FILE = "roles.json"
RULES: tuple[tuple[str, str, str, float], ...] = (
    # (role, statistic, comparison, threshold)
    ("previous_token", "to_previous", ">=", 0.5),
    ("next_token", "to_next", ">=", 0.5),
    ("self", "to_self", ">=", 0.5),
    ("broadcast_sep", "to_sep", ">=", 0.5),
    ("broadcast_cls", "to_cls", ">=", 0.5),
    ("broad", "entropy_relative", ">=", 0.75),
    ("local", "mean_distance", "<=", 2.0),
)
FAMILY = {"previous_token": "positional", "next_token": "positional", "self": "positional", "local": "positional",
          "broadcast_sep": "global", "broadcast_cls": "global", "broad": "global", "content": "syntactic/semantic"}


def probe_sentences() -> list[str]:
    text = resources.files("attention_server.data").joinpath("probe_sentences.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


# Roles that need a token to see later tokens: never offered for a causal model, whose
# attention above the diagonal is zero by construction.
LOOKS_AHEAD = frozenset({"next_token"})


def rules_for(causal: bool) -> tuple[tuple[str, str, str, float], ...]:
    """The rules that make sense for a model: all of them, or without LOOKS_AHEAD for a causal one."""
    return tuple(r for r in RULES if not (causal and r[0] in LOOKS_AHEAD))


def label(stats: dict[str, float], causal: bool = False) -> tuple[str, float]:
    """The role of a head from its mean statistics, and the deciding value."""
    for role, name, op, threshold in rules_for(causal):
        value = stats[name]
        if (value >= threshold) if op == ">=" else (value <= threshold):
            return role, value
    return "content", stats["entropy_relative"]


def probe_statistics(runtime: Runtime, tokenizer: Tokenizer, meta: ModelMetadata,
                     sentences: list[str], batch_size: int = 32) -> tuple[np.ndarray, int]:
    """Mean head statistics over the sentences that fit the model's positions:
    [layers, heads, len(STATISTICS)], and how many sentences that is (0: no statistics)."""
    cls_id = meta.special_tokens.get("cls", {}).get("id")
    sep_id = meta.special_tokens.get("sep", {}).get("id")
    # A model with few positions (a tiny test model) skips the probe sentences it cannot take.
    encoded = [t for t in tokenizer.encode_batch([(s, None) for s in sentences]) if len(t) <= meta.max_positions]
    total = np.zeros((meta.num_layers, meta.num_heads, len(STATISTICS)))
    if not encoded:
        return total.astype(np.float32), 0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        attention = runtime.run(pad_batch(batch, meta.pad_token_id), ["attentions"])["attentions"]
        for row, tokens in enumerate(batch):
            n = len(tokens)
            total += head_statistics(attention[row, :, :, :n, :n], tokens, cls_id, sep_id, causal=meta.causal)
    return (total / len(encoded)).astype(np.float32), len(encoded)


def compute_roles(runtime: Runtime, tokenizer: Tokenizer, meta: ModelMetadata) -> list[HeadRole]:
    """Every head's role from the probe corpus; none when no probe sentence fits the model's
    positions (all-zero statistics would label every head "local" with nothing behind it)."""
    sentences = probe_sentences()
    stats, used = probe_statistics(runtime, tokenizer, meta, sentences)
    if not used:
        log.warning("head roles of %s: none of the %d probe sentences fits its %d positions; no roles",
                    meta.name, len(sentences), meta.max_positions)
        return []
    roles = []
    for layer in range(meta.num_layers):
        for head in range(meta.num_heads):
            named = {k: round(float(v), 5) for k, v in zip(STATISTICS, stats[layer, head], strict=True)}
            role, score = label(named, meta.causal)
            roles.append(HeadRole(layer, head, role, FAMILY[role], round(float(score), 5), named))
    log.info("head roles of %s computed from %d of %d probe sentences", meta.name, used, len(sentences))
    return roles


def load_or_compute(folder: Path, runtime: Runtime, tokenizer: Tokenizer,
                    meta: ModelMetadata) -> list[HeadRole]:
    """roles.json from the model folder, or computed now and written there (kept
    in memory only when the folder is read-only)."""
    path = folder / ROLES_FILE
    linked = path.is_symlink()  # a link may point outside the model folder: neither read nor written
    if linked:
        log.warning("%s is a link; computing head roles without reading or writing it", path)
    elif path.is_file():
        try:
            raw = json.loads(path.read_text())
            if raw.get("sha256") == meta.sha256:
                return [HeadRole(**entry) for entry in raw["heads"]]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s unreadable (%s); computing head roles again", path, exc)
    roles = compute_roles(runtime, tokenizer, meta)
    if linked:
        return roles
    try:
        path.write_text(json.dumps({"sha256": meta.sha256, "corpus": "attention_server/data/probe_sentences.txt",
                                    "heads": [asdict(r) for r in roles]}, indent=1) + "\n")
    except OSError as exc:
        log.warning("could not store head roles in %s (%s); keeping them in memory", path, exc)
    return roles
