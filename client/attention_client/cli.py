"""`attention-client`: read heads from the command line.

    attention-client analyze "The transformer model processes all tokens." --top-k 3
    attention-client analyze "..." --json result.json --npz result.npz
    attention-client models
    attention-client heads [MODEL]
    attention-client --ca-file ca.pem --token-file token.txt models    # TLS and a bearer token
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ._channel import TOKEN_ENV, read_pem
from ._client import AttentionClient
from .errors import AttentionError
from .results import AnalyzeResult, ModelInfo


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


def result_to_json(result: AnalyzeResult) -> dict[str, Any]:
    return {
        "index": result.index,
        "id": result.id,
        "tokens": [vars(t) for t in result.tokens],
        "layers": result.layers,
        "heads": result.heads,
        "pairs": [
            {"layer": hp.layer, "head": hp.head, "pairs": [vars(p) for p in hp.pairs]} for hp in result.pairs
        ],
        "attention": None if result.attention is None else result.attention.astype(float).tolist(),
        "hidden_states": None if result.hidden_states is None else result.hidden_states.astype(float).tolist(),
    }


def save_npz(results: list[AnalyzeResult], path: Path) -> None:
    arrays: dict[str, np.ndarray] = {}
    for r in results:
        arrays[f"seq{r.index}_token_ids"] = np.array([t.id for t in r.tokens], dtype=np.int64)
        arrays[f"seq{r.index}_tokens"] = np.array(r.token_texts)
        arrays[f"seq{r.index}_layers"] = np.array(r.layers, dtype=np.int32)
        arrays[f"seq{r.index}_heads"] = np.array(r.heads, dtype=np.int32)
        if r.attention is not None:
            arrays[f"seq{r.index}_attention"] = r.attention
        if r.hidden_states is not None:
            arrays[f"seq{r.index}_hidden_states"] = r.hidden_states
    np.savez_compressed(path, **arrays)


def format_models(models: list[ModelInfo]) -> str:
    lines = []
    for m in models:
        lines.append(f"{m.name}: {m.architecture}, {m.num_layers} layers x {m.num_heads} heads, hidden "
                     f"{m.hidden_size}, {m.max_positions} positions, vocab {m.vocab_size}, max batch "
                     f"{m.max_batch_size}\n  source: {m.source}\n  sha256: {m.sha256}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attention-client", description="Client for the attention service.")
    parser.add_argument("--target", default=os.environ.get("ATTENTION_TARGET", "localhost:50051"),
                        help="server address (default: $ATTENTION_TARGET or localhost:50051)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    security = parser.add_argument_group(
        "security", "TLS when any of --tls, --ca-file, --cert-file, --key-file is given; plaintext otherwise")
    security.add_argument("--tls", action="store_true",
                          help="TLS, trusting gRPC's default root certificates (use --ca-file for a private CA)")
    security.add_argument("--ca-file", type=Path, metavar="PEM",
                          help="CA certificate(s) that signed the server's certificate (implies TLS)")
    security.add_argument("--cert-file", type=Path, metavar="PEM",
                          help="client certificate chain, for a server that requires mutual TLS (with --key-file)")
    security.add_argument("--key-file", type=Path, metavar="PEM", help="private key of --cert-file")
    token = security.add_mutually_exclusive_group()
    token.add_argument("--token", metavar="TOKEN", default=None,
                       help=f"bearer token sent as 'authorization: Bearer ...' (default: ${TOKEN_ENV}); "
                            "visible to other local users in the process list, prefer --token-file or the "
                            "environment variable")
    token.add_argument("--token-file", type=Path, metavar="FILE",
                       help="read the bearer token from this file (its first line)")
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser("analyze", help="top pairs per head for one or more texts")
    analyze.add_argument("texts", nargs="+", help="input text(s)")
    analyze.add_argument("--model", default="")
    analyze.add_argument("--layers", type=int, nargs="*", default=None)
    analyze.add_argument("--heads", type=int, nargs="*", default=None)
    analyze.add_argument("--top-k", type=int, default=3, help="pairs per head (default 3)")
    analyze.add_argument("--min-strength", type=float, default=0.0)
    analyze.add_argument("--include-special", action="store_true",
                         help="keep pairs with [CLS]/[SEP] in the table (left out by default: they dominate)")
    analyze.add_argument("--float16", action="store_true", help="ask for float16 attention")
    analyze.add_argument("--words", action="store_true", help="word-level pairs (split words joined)")
    analyze.add_argument("--json", type=Path, help="write the full result as JSON")
    analyze.add_argument("--npz", type=Path, help="write tokens, attention and hidden states as .npz")

    analyze.add_argument("--html", type=Path, help="write an interactive head view (offline HTML)")

    explore = sub.add_parser("explore", help="a local web page to explore heads interactively")
    explore.add_argument("--model", default="")
    explore.add_argument("--host", default="127.0.0.1")
    explore.add_argument("--port", type=int, default=8080, help="0 picks a free port")

    sub.add_parser("models", help="list the served models")
    heads = sub.add_parser("heads", help="list a model's heads")
    heads.add_argument("model", nargs="?", default="")
    return parser


def _token(args: argparse.Namespace) -> str | None:
    """--token, the first line of --token-file, or None ($ATTENTION_TOKEN, read by the client)."""
    if args.token_file is None:
        return args.token
    try:
        lines = args.token_file.read_text().splitlines()
    except OSError as exc:
        raise OSError(f"--token-file: cannot read {args.token_file}: {exc.strerror or exc}") from None
    if not lines or not lines[0].strip():
        raise ValueError(f"--token-file: {args.token_file} is empty")
    return lines[0]


def _open_client(args: argparse.Namespace) -> AttentionClient:
    if (args.cert_file is None) != (args.key_file is None):
        raise ValueError("--cert-file and --key-file go together (a client certificate and its key)")
    return AttentionClient(args.target, timeout=args.timeout, root_certificates=read_pem(args.ca_file, "--ca-file"),
                           certificate_chain=read_pem(args.cert_file, "--cert-file"),
                           private_key=read_pem(args.key_file, "--key-file"), tls=args.tls, token=_token(args))


def _say(exc: Exception) -> str:
    """An error about a file, as a person reads it: no errno, the file named once."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        client = _open_client(args)
    except (OSError, ValueError) as exc:  # a missing or bad PEM or token file: the message names it
        print(f"attention-client: {_say(exc)}", file=sys.stderr)
        return 2
    try:
        with client:
            if args.command == "explore":
                from .explore import Explorer

                httpd = Explorer(client, args.model).server(args.host, args.port)
                print(f"explorer on http://{args.host}:{httpd.server_port}/ (Ctrl-C stops it)", flush=True)
                try:
                    httpd.serve_forever()
                except KeyboardInterrupt:
                    pass
                finally:
                    httpd.server_close()
            elif args.command == "models":
                print(format_models(client.list_models()))
            elif args.command == "heads":
                info = client.get_model(args.model)
                print(f"{info.name}: {len(info.heads)} heads")
                for h in info.heads:
                    stats = ", ".join(f"{k}={v:.3g}" for k, v in sorted(h.statistics.items()))
                    print(f"  layer {h.layer:>2} head {h.index:>2}  {h.role or '-':<14} {h.family or '-':<18} "
                          f"{stats}".rstrip())
            else:
                full = bool(args.json or args.npz or args.html)
                results = client.analyze(
                    args.texts, model=args.model, layers=args.layers, heads=args.heads, top_k=args.top_k,
                    min_strength=args.min_strength, exclude_special_tokens=not args.include_special,
                    attention=full, hidden_states=full, attention_dtype="float16" if args.float16 else "float32",
                    word_level=args.words or bool(args.html), head_statistics=bool(args.html),
                )
                info = client.get_model(args.model)
                roles = {(h.layer, h.index): h.role for h in info.heads if h.role}
                for text, result in zip(args.texts, results, strict=True):
                    if len(results) > 1:
                        print(f"# {text}")
                    print(format_pairs(result, roles, words=args.words))
                if not args.include_special:
                    print("(pairs with special tokens left out; --include-special shows them)")
                if args.json:
                    args.json.write_text(json.dumps([result_to_json(r) for r in results]))
                if args.npz:
                    save_npz(results, args.npz)
                if args.html:
                    from .viz import head_view_html

                    head_view_html(results[0], info, args.html)
    except AttentionError as exc:
        print(f"attention-client: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
