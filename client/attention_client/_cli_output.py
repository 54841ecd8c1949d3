"""What `attention-client analyze` writes, one result at a time as results arrive (so a
long input never holds every result in memory): the pair table, JSON, .npz, HTML
head views, and the progress bar on stderr."""

from __future__ import annotations

import html
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

import numpy as np
import numpy.typing as npt

from .results import AnalyzeResult, ModelInfo


@dataclass(frozen=True)
class Item:
    """One input sequence of the CLI: text, optional second text, optional label."""

    text: str
    text_pair: str | None = None
    id: str = ""


class Writer(Protocol):
    def add(self, position: int, item: Item, result: AnalyzeResult) -> None: ...

    def close(self) -> None: ...


def format_pairs(result: AnalyzeResult, roles: dict[tuple[int, int], str] | None = None,
                 words: bool = False) -> str:
    """The table a person reads: layer, head, (role,) from token or word, to, strength."""
    rows = result.word_pair_rows() if words else result.pair_rows()
    roles = roles or {}
    width = max([len("from"), *(max(len(f), len(t)) for _, _, f, t, _ in rows)]) if rows else 4
    rw = max([len("role"), *(len(r) for r in roles.values())]) if roles else 0
    role_head = f"  {'role':<{rw}}" if roles else ""
    lines = [f"{'layer':>5}  {'head':>4}{role_head}  {'from':<{width}}  {'to':<{width}}  {'strength':>8}"]
    for layer, head, frm, to, strength in rows:
        role = f"  {roles.get((layer, head), '-'):<{rw}}" if roles else ""
        lines.append(f"{layer:>5}  {head:>4}{role}  {frm:<{width}}  {to:<{width}}  {strength * 100:>7.1f}%")
    return "\n".join(lines)


def _floats(array: npt.NDArray[Any] | None) -> Any:
    return None if array is None else array.astype(float).tolist()


def result_to_json(result: AnalyzeResult, item: Item | None = None, position: int | None = None) -> dict[str, Any]:
    """A result as JSON-ready data (matrices as nested lists); `position` in the whole input."""
    data: dict[str, Any] = {
        "index": result.index if position is None else position,
        "id": result.id,
    }
    if item is not None:
        data["text"] = item.text
        if item.text_pair is not None:
            data["text_pair"] = item.text_pair
    data.update({
        "tokens": [vars(t) for t in result.tokens],
        "layers": result.layers,
        "heads": result.heads,
        "pairs": [{"layer": hp.layer, "head": hp.head, "pairs": [vars(p) for p in hp.pairs]} for hp in result.pairs],
        "attention": _floats(result.attention),
        "hidden_states": _floats(result.hidden_states),
    })
    if result.layer_hidden_states is not None:
        data["hidden_states_layers"] = result.hidden_states_layers
        data["layer_hidden_states"] = _floats(result.layer_hidden_states)
    if result.queries is not None:
        data["queries"] = _floats(result.queries)
        data["keys"] = _floats(result.keys)
    if result.words:
        data["words"] = [vars(w) for w in result.words]
        data["word_pairs"] = [{"layer": hp.layer, "head": hp.head, "pairs": [vars(p) for p in hp.pairs]}
                              for hp in result.word_pairs]
    return data


def format_models(models: list[ModelInfo]) -> str:
    lines = []
    for m in models:
        lines.append(f"{m.name}: {m.architecture}, {m.num_layers} layers x {m.num_heads} heads, hidden "
                     f"{m.hidden_size}, {m.max_positions} positions, vocab {m.vocab_size}, max batch "
                     f"{m.max_batch_size}\n  attention: {_attention_kind(m)}\n  special tokens: "
                     f"{_special_tokens(m)}\n  on request: {_extra_outputs(m)}\n  source: {m.source}"
                     f"\n  sha256: {m.sha256}")
    return "\n".join(lines)


def _attention_kind(m: ModelInfo) -> str:
    """causal or bidirectional, key/value heads (which query heads share one), positions."""
    kind = "causal (each token sees itself and earlier tokens)" if m.causal else "bidirectional"
    kv = m.num_key_value_heads or m.num_heads
    if kv < m.num_heads:
        group = m.num_heads // kv
        heads = f"{kv} key/value heads (grouped-query: query heads {group} by {group} share one)"
    else:
        heads = f"{kv} key/value heads (one per head)"
    return f"{kind}, {heads}, {m.position_embedding or 'absolute'} positions"


def _special_tokens(m: ModelInfo) -> str:
    return ", ".join(f"{name}={text} ({id_})" for name, (text, id_) in sorted(m.special_tokens.items())) or "none"


def _extra_outputs(m: ModelInfo) -> str:
    extra = [name for name, ok in (("hidden_states_layers", m.supports_hidden_states_layers),
                                   ("query_key", m.supports_query_key)) if ok]
    return ", ".join(extra) if extra else "none (exported without per-layer outputs)"


class Progress:
    """A tqdm bar on stderr (the `cli` extra), or nothing. Text for stdout goes through
    `print` so that it does not tear the bar."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm  # the `cli` extra; main() checks it is there before asking for a bar

            self._bar = tqdm(total=total, unit="seq", file=sys.stderr, dynamic_ncols=True, leave=True)

    def print(self, text: str) -> None:
        if self._bar is None:
            print(text)
        else:
            self._bar.write(text, file=sys.stdout)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.close()


class TableWriter:
    """The pair table per result on stdout, headed by its text when there are several."""

    def __init__(self, progress: Progress, roles: dict[tuple[int, int], str], words: bool, several: bool) -> None:
        self.progress, self.roles, self.words, self.several = progress, roles, words, several

    def add(self, position: int, item: Item, result: AnalyzeResult) -> None:
        if self.several:
            label = f"[{item.id}] " if item.id else ""
            pair = f" | {item.text_pair}" if item.text_pair is not None else ""
            self.progress.print(f"# {label}{item.text}{pair}")
        self.progress.print(format_pairs(result, self.roles, words=self.words))

    def close(self) -> None:
        pass


class JsonWriter:
    """A JSON array, one element per result, written as results come ('-': stdout)."""

    def __init__(self, target: Path | str) -> None:
        self._own = str(target) != "-"
        self._out: IO[str] = open(target, "w", encoding="utf-8") if self._own else sys.stdout
        self._count = 0

    def add(self, position: int, item: Item, result: AnalyzeResult) -> None:
        self._out.write("[\n" if self._count == 0 else ",\n")
        self._out.write(json.dumps(result_to_json(result, item, position)))
        self._count += 1

    def close(self) -> None:
        self._out.write("[]\n" if self._count == 0 else "\n]\n")
        if self._own:
            self._out.close()
        else:
            self._out.flush()


class NpzWriter:
    """An .npz file (what np.load reads) written array by array as results come:
    seq{N}_token_ids, _tokens, _layers, _heads, _attention, _hidden_states (and, when
    asked, _hidden_states_layers, _layer_hidden_states, _queries, _keys), with N the
    position in the whole input."""

    def __init__(self, path: Path) -> None:
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)

    def _put(self, name: str, array: npt.NDArray[Any]) -> None:
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

    def add(self, position: int, item: Item, result: AnalyzeResult) -> None:
        key = f"seq{position}"
        self._put(f"{key}_token_ids", np.array([t.id for t in result.tokens], dtype=np.int64))
        self._put(f"{key}_tokens", np.array(result.token_texts, dtype=str))
        self._put(f"{key}_layers", np.array(result.layers, dtype=np.int32))
        self._put(f"{key}_heads", np.array(result.heads, dtype=np.int32))
        if result.attention is not None:
            self._put(f"{key}_attention", result.attention)
        if result.hidden_states is not None:
            self._put(f"{key}_hidden_states", result.hidden_states)
        if result.layer_hidden_states is not None:
            self._put(f"{key}_hidden_states_layers", np.array(result.hidden_states_layers, dtype=np.int32))
            self._put(f"{key}_layer_hidden_states", result.layer_hidden_states)
        for name, array in (("queries", result.queries), ("keys", result.keys)):
            if array is not None:
                self._put(f"{key}_{name}", array)

    def close(self) -> None:
        self._zip.close()


def save_npz(results: list[AnalyzeResult], path: Path) -> None:
    """Results as one .npz (keys seq{index}_...)."""
    writer = NpzWriter(path)
    try:
        for k, result in enumerate(results):
            writer.add(k, Item(""), result)
    finally:
        writer.close()


class HtmlWriter:
    """Offline head views. One text: the page at `path`. Several: one page per text next to
    it (`<stem>-<N>.html`) and at `path` a page that picks among them (a list of the texts;
    the chosen view opens beside it)."""

    def __init__(self, path: Path, info: ModelInfo, total: int) -> None:
        self.path, self.info, self.total = path, info, total
        self._digits = len(str(max(total - 1, 0)))
        self._pages: list[tuple[Item, str]] = []

    def page_path(self, position: int) -> Path:
        if self.total == 1:
            return self.path
        return self.path.with_name(f"{self.path.stem}-{position:0{self._digits}d}{self.path.suffix or '.html'}")

    def add(self, position: int, item: Item, result: AnalyzeResult) -> None:
        from .viz import head_view_html

        page = self.page_path(position)
        head_view_html(result, self.info, page)
        self._pages.append((item, page.name))

    def close(self) -> None:
        if self.total > 1 or not self._pages:
            self.path.write_text(picker_page(self._pages, self.info.name), encoding="utf-8")


def picker_page(pages: list[tuple[Item, str]], model: str) -> str:
    """One page listing the texts; each opens its head view in the frame beside the list."""
    rows = []
    for k, (item, href) in enumerate(pages):
        label = html.escape(item.id or str(k))
        text = item.text if len(item.text) <= 140 else item.text[:137] + "..."
        pair = f' <span class="pair">| {html.escape(item.text_pair)}</span>' if item.text_pair else ""
        rows.append(f'<li><a href="{html.escape(href, quote=True)}" target="view">'
                    f'<span class="id">{label}</span> {html.escape(text)}{pair}</a></li>')
    first = html.escape(pages[0][1], quote=True) if pages else "about:blank"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Attention head views ({len(pages)} texts)</title>
<style>
  body {{ font-family: system-ui, sans-serif; margin: 0; display: flex; height: 100vh; color: #1d2330; }}
  nav {{ width: 320px; overflow-y: auto; border-right: 1px solid #d8dde6; background: #fafbfc; }}
  h1 {{ font-size: 15px; margin: 12px; }}
  ol {{ list-style: none; margin: 0; padding: 0; }}
  li a {{ display: block; padding: 6px 12px; font-size: 13px; color: inherit; text-decoration: none;
          border-bottom: 1px solid #e3e7ee; }}
  li a:hover, li a:focus {{ background: #e8f0fe; }}
  .id {{ color: #5b6475; font-variant-numeric: tabular-nums; margin-right: 4px; }}
  .pair {{ color: #5b6475; }}
  iframe {{ flex: 1; border: 0; height: 100vh; }}
</style>
</head>
<body>
<nav><h1>{html.escape(model)}: {len(pages)} texts</h1><ol>
{chr(10).join(rows)}
</ol></nav>
<iframe name="view" title="head view" src="{first}"></iframe>
</body>
</html>
"""
