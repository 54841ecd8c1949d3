"""Pictures of heads: heatmap PNGs (matplotlib, the `plot` extra) and a
self-contained interactive HTML page (no CDN, works offline) with a head view and
a model view. For bertviz itself, see AnalyzeResult.to_bertviz()."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidArgumentError
from .results import AnalyzeResult, FloatArray, ModelInfo


def _template() -> str:
    return resources.files("attention_client.assets").joinpath("head_view.html").read_text()


def view_data(result: AnalyzeResult, info: ModelInfo | None = None, decimals: int = 7) -> dict[str, Any]:
    """What the head view shows, as JSON-ready data: token and word matrices of
    the result's layers and heads, roles from `info`, per-sequence statistics."""
    if result.attention is None:
        raise InvalidArgumentError("attention: not in this result; the head view needs the matrices "
                                   "(analyze with attention=True)")
    stats = {f"{h.layer},{h.index}": h.statistics for h in result.head_statistics}
    roles = {}
    if info is not None:
        roles = {f"{h.layer},{h.index}": {"role": h.role, "family": h.family, "score": h.role_score,
                                          "statistics": h.statistics} for h in info.heads if h.role}
    data: dict[str, Any] = {
        "model": info.name if info else "",
        "layers": result.layers,
        "heads": result.heads,
        "roles": roles,
        "token_view": {
            "texts": result.token_texts,
            "special": [t.special for t in result.tokens],
            "attention": np.round(result.attention.astype(np.float32), decimals).tolist(),
            "stats": stats,
        },
        "word_view": None,
    }
    if result.word_attention is not None:
        data["word_view"] = {
            "texts": [w.text for w in result.words],
            "special": [w.special for w in result.words],
            "attention": np.round(result.word_attention.astype(np.float32), decimals).tolist(),
            "stats": stats,
        }
    return data


def render_page(data: dict[str, Any] | None, mode: str) -> str:
    payload = json.dumps(data).replace("</", "<\\/")
    return _template().replace("__DATA__", payload).replace("__MODE__", mode)


def explorer_html() -> str:
    """The explorer page: type a sentence, see its heads. It calls attention.v1 as
    HTTP/JSON at relative URLs (`v1/models/{name}`, `v1/analyze`), so it is served
    beside them: by `attention-client explore` and by the server's HTTP port."""
    return render_page(None, "explore")


def head_view_html(result: AnalyzeResult, info: ModelInfo | None = None, path: str | Path | None = None) -> str:
    """A self-contained HTML page: pick a layer and head, hover a word to see its
    pairs as lines of varying strength, with the head's role and statistics; "All heads"
    (or `#all-heads` in the URL) shows every returned head as a small heatmap, a row per
    layer, and a click opens one."""
    html = render_page(view_data(result, info), "static")
    if path is not None:
        Path(path).write_text(html)
    return html


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ImportError("plots need matplotlib: pip install 'attention-client[plot]'") from exc
    return plt


def _matrix(result: AnalyzeResult, layer: int, head: int, words: bool) -> tuple[FloatArray, list[str]]:
    if words:
        word_attention = result.word_attention
        if word_attention is None:
            raise InvalidArgumentError("word_attention: not in this result; word-level plots need "
                                       "analyze(..., word_level=True)")
        result.head_attention(layer, head)  # the same checks of layer and head
        m = word_attention[result.layers.index(layer), result.heads.index(head)]
        return m.astype(np.float32), [w.text for w in result.words]
    return result.head_attention(layer, head).astype(np.float32), result.token_texts


def heatmap_png(result: AnalyzeResult, layer: int, head: int, path: str | Path, words: bool = False,
                title: str | None = None) -> Path:
    """One head's matrix as a heatmap (rows: from, columns: to)."""
    plt = _pyplot()
    matrix, labels = _matrix(result, layer, head, words)
    size = max(4.0, 0.32 * len(labels) + 1.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("to")
    ax.set_ylabel("from")
    ax.set_title(title or f"layer {layer}, head {head}")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def layer_grid_png(result: AnalyzeResult, layer: int, path: str | Path, words: bool = False,
                   info: ModelInfo | None = None) -> Path:
    """All returned heads of one layer side by side, titled with their roles."""
    plt = _pyplot()
    roles = {(h.layer, h.index): h.role for h in info.heads} if info else {}
    heads = result.heads
    cols = min(4, len(heads))
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        if k >= len(heads):
            ax.axis("off")
            continue
        matrix, _ = _matrix(result, layer, heads[k], words)
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
        role = roles.get((layer, heads[k]), "")
        ax.set_title(f"head {heads[k]}" + (f" · {role}" if role else ""), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"layer {layer}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
