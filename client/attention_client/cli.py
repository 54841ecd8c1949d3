"""`attention-client`: read heads from the command line.

    attention-client analyze "The transformer model processes all tokens." --top-k 3
    attention-client analyze "..." --json result.json --npz result.npz --html view.html
    attention-client analyze --input texts.jsonl --json - > results.json   # a file, JSON to stdout
    cat texts.txt | attention-client analyze - --stream                     # stdin, one text per line
    attention-client models
    attention-client heads [MODEL]
    attention-client --ca-file ca.pem --token-file token.txt models    # TLS and a bearer token

Exit status: 0 done, 1 a failed call (the status and message on stderr), 2 a usage,
input or file error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from ._channel import TOKEN_ENV, read_pem
from ._cli_input import FORMATS, InputError, gather
from ._cli_output import (
    HtmlWriter,
    Item,
    JsonWriter,
    NpzWriter,
    Progress,
    TableWriter,
    Writer,
    format_models,
    format_pairs,
    result_to_json,
    save_npz,
)
from ._client import AttentionClient
from .errors import AttentionError
from .results import AnalyzeResult, ModelInfo

__all__ = ["format_models", "format_pairs", "main", "result_to_json", "save_npz"]

FALLBACK_BATCH = 32
"""Sequences per request when the server does not tell its max_batch_size."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attention-client", description="Client for the attention service.")
    parser.add_argument("--target", default=os.environ.get("ATTENTION_TARGET", "localhost:50051"),
                        help="server address, any gRPC target: host:port, dns:///name:port, "
                             "ipv4:10.0.0.1:50051,10.0.0.2:50051, unix:PATH; calls are spread over every address "
                             "it resolves to and retried on another when one is down "
                             "(default: $ATTENTION_TARGET or localhost:50051)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default 60)")
    parser.add_argument("--wait-for-ready", action="store_true",
                        help="when no server is reachable, wait for one (up to --timeout) instead of failing at once")
    parser.add_argument("--authority", metavar="NAME",
                        help="the server name for TLS and the :authority header (default: the target's host); "
                             "needed with TLS when --target is a list of addresses (ipv4:...)")
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

    analyze = sub.add_parser(
        "analyze", help="top pairs per head for one or more texts",
        description="Top pairs per head for texts from the command line, stdin or a file. Large inputs are "
                    "sent in requests of the server's max_batch_size, with a progress bar on stderr.")
    analyze.add_argument("texts", nargs="*", metavar="TEXT",
                         help="input text(s); '-' reads them from stdin (one per line, or JSON lines)")
    analyze.add_argument("-i", "--input", metavar="FILE",
                         help="read inputs from FILE ('-': stdin): one text per line, or JSON lines "
                              "{\"text\": ..., \"text_pair\": ..., \"id\": ...}; blank lines are skipped")
    analyze.add_argument("--input-format", choices=FORMATS, default="auto",
                         help="how to read stdin and --input: 'text' (a text per line), 'jsonl', or 'auto' "
                              "(JSON lines when the first line is a JSON object; the default)")
    analyze.add_argument("--text-pair", metavar="TEXT",
                         help="second text for sentence-pair input (segment 1), with exactly one TEXT")
    analyze.add_argument("--model", default="", help="model name (default: the server's default model)")
    analyze.add_argument("--layers", type=int, nargs="+", metavar="N",
                         help="layers to analyze, 0-based (default: all)")
    analyze.add_argument("--heads", type=int, nargs="+", metavar="N",
                         help="heads to analyze within each layer, 0-based (default: all)")
    analyze.add_argument("--top-k", type=int, default=3, help="pairs per head (default 3)")
    analyze.add_argument("--min-strength", type=float, default=0.0,
                         help="leave out pairs weaker than this, 0..1 (default 0)")
    analyze.add_argument("--include-special", action="store_true",
                         help="keep pairs with [CLS]/[SEP] in the table (left out by default: they dominate)")
    analyze.add_argument("--float16", action="store_true", help="ask for float16 attention (half the bytes)")
    analyze.add_argument("--words", action="store_true", help="word-level pairs (split words joined)")
    analyze.add_argument("--json", metavar="PATH",
                         help="write the full results (tokens, pairs, attention, hidden states) as a JSON array; "
                              "'-' writes it to stdout instead of the table")
    analyze.add_argument("--npz", type=Path, metavar="PATH",
                         help="write tokens, attention and hidden states as .npz (keys seq<N>_...)")
    analyze.add_argument("--html", type=Path, metavar="PATH",
                         help="write an interactive head view (offline HTML); with several texts, one page per "
                              "text (PATH's name + -<N>) and at PATH a page to pick among them")
    analyze.add_argument("--hidden-states-layers", type=int, nargs="+", metavar="N",
                         help="also the hidden states of these layers (0: embeddings .. num_layers: last layer), "
                              "into --npz / --json")
    analyze.add_argument("--query-key", action="store_true",
                         help="also the query and key vectors of the selected layers/heads, into --npz / --json")
    analyze.add_argument("--stream", action="store_true",
                         help="use AnalyzeStream: each result is written as soon as it is computed")
    analyze.add_argument("--batch-size", type=int, metavar="N",
                         help="sequences per request (default and upper bound: the server's max_batch_size)")
    analyze.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="progress bar on stderr (default: when stderr is a terminal and there is more than "
                              "one text; needs tqdm, the 'cli' extra)")

    explore = sub.add_parser("explore", help="a local web page to explore heads interactively")
    explore.add_argument("--model", default="", help="model name (default: the server's default model)")
    explore.add_argument("--host", default="127.0.0.1", help="address the page listens on (default 127.0.0.1)")
    explore.add_argument("--port", type=int, default=8080, help="0 picks a free port")

    sub.add_parser("models", help="list the served models")
    heads = sub.add_parser("heads", help="list a model's heads")
    heads.add_argument("model", nargs="?", default="", help="model name (default: the server's default model)")
    return parser


def _token(args: argparse.Namespace) -> str | None:
    """--token, the first line of --token-file, or None ($ATTENTION_TOKEN, read by the client)."""
    if args.token_file is None:
        return None if args.token is None else str(args.token)
    try:
        lines = args.token_file.read_text().splitlines()
    except OSError as exc:
        raise OSError(f"--token-file: cannot read {args.token_file}: {exc.strerror or exc}") from None
    if not lines or not lines[0].strip():
        raise ValueError(f"--token-file: {args.token_file} is empty")
    return str(lines[0])


def _open_client(args: argparse.Namespace) -> AttentionClient:
    if (args.cert_file is None) != (args.key_file is None):
        raise ValueError("--cert-file and --key-file go together (a client certificate and its key)")
    return AttentionClient(args.target, timeout=args.timeout, root_certificates=read_pem(args.ca_file, "--ca-file"),
                           certificate_chain=read_pem(args.cert_file, "--cert-file"),
                           private_key=read_pem(args.key_file, "--key-file"), tls=args.tls, token=_token(args),
                           wait_for_ready=args.wait_for_ready,
                           options=[("grpc.default_authority", args.authority)] if args.authority else None)


def _say(exc: Exception) -> str:
    """An error about a file, as a person reads it: no errno, the file named once."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc)


def _has_tqdm() -> bool:
    return importlib.util.find_spec("tqdm") is not None


def _check_analyze_args(args: argparse.Namespace, stderr_tty: bool) -> bool:
    """Usage errors of `analyze` found before anything is read or sent (InputError); whether to show a bar."""
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size: must be at least 1, got {args.batch_size}")
    if args.npz is not None and str(args.npz) == "-":
        raise InputError("--npz: needs a file path (.npz is binary)")
    if args.html is not None and str(args.html) == "-":
        raise InputError("--html: needs a file path")
    if (args.hidden_states_layers or args.query_key) and not (args.npz or args.json):
        raise InputError("--hidden-states-layers / --query-key: their arrays go to --npz or --json; give one")
    if args.progress and not _has_tqdm():
        raise InputError("--progress needs tqdm: pip install 'attention-client[cli]'")
    if args.progress is None:
        return stderr_tty and _has_tqdm()
    return bool(args.progress)


def _chunks(items: list[Item], size: int) -> Iterable[tuple[int, list[Item]]]:
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def _analyze(client: AttentionClient, args: argparse.Namespace, items: list[Item], show_bar: bool) -> int:
    info = client.get_model(args.model)
    limit = info.max_batch_size if info.max_batch_size > 0 else FALLBACK_BATCH
    size = min(args.batch_size or limit, limit)
    full = bool(args.json or args.npz or args.html)
    json_to_stdout = args.json == "-"
    roles = {(h.layer, h.index): h.role for h in info.heads if h.role}
    done = 0
    with Progress(len(items), show_bar and len(items) > 1) as progress:
        writers: list[Writer] = []
        try:
            if not json_to_stdout:
                writers.append(TableWriter(progress, roles, args.words, several=len(items) > 1))
            if args.json:
                writers.append(JsonWriter(args.json))
            if args.npz:
                writers.append(NpzWriter(args.npz))
            if args.html:
                writers.append(HtmlWriter(args.html, info, len(items)))
            for start, chunk in _chunks(items, size):
                results = _call(client, args, chunk, full)
                for result in results:
                    position = start + result.index
                    for writer in writers:
                        writer.add(position, chunk[result.index], result)
                    done += 1
                    progress.update()
        except AttentionError:
            if len(items) > 1:
                print(f"attention-client: stopped after {done} of {len(items)} texts; the outputs hold those",
                      file=sys.stderr)
            raise
        finally:
            for writer in writers:
                writer.close()
        if not json_to_stdout and not args.include_special:
            progress.print("(pairs with special tokens left out; --include-special shows them)")
    return 0


def _call(client: AttentionClient, args: argparse.Namespace, chunk: list[Item],
          full: bool) -> Iterable[AnalyzeResult]:
    """One request for a chunk of inputs: a list (Analyze), or results as they come (AnalyzeStream)."""
    method = client.analyze_stream if args.stream else client.analyze_batch
    return method(
        [item.text for item in chunk],
        text_pairs=[item.text_pair for item in chunk] if any(i.text_pair is not None for i in chunk) else None,
        ids=[item.id for item in chunk] if any(i.id for i in chunk) else None,
        model=args.model, layers=args.layers, heads=args.heads, top_k=args.top_k, min_strength=args.min_strength,
        exclude_special_tokens=not args.include_special, attention=full, hidden_states=full,
        attention_dtype="float16" if args.float16 else "float32", word_level=args.words or bool(args.html),
        head_statistics=bool(args.html), hidden_states_layers=args.hidden_states_layers, query_key=args.query_key,
    )


def _heads(info: ModelInfo) -> None:
    grouped = 0 < info.num_key_value_heads < info.num_heads
    # "8 heads, 2 key/value heads" read as 2 of 8: say both per layer.
    shape = f"{len(info.heads)} heads ({info.num_layers} layers x {info.num_heads})"
    print(f"{info.name}: {shape}" + (f", {info.num_key_value_heads} key/value heads per layer" * grouped)
          + (" (causal)" if info.causal else ""))
    for h in info.heads:
        stats = ", ".join(f"{k}={v:.3g}" for k, v in sorted(h.statistics.items()))
        kv = f" kv {h.kv_head:>2}" if grouped else ""
        print(f"  layer {h.layer:>2} head {h.index:>2}{kv}  {h.role or '-':<14} {h.family or '-':<18} {stats}".rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    items: list[Item] = []
    show_bar = False
    if args.command == "analyze":
        try:
            show_bar = _check_analyze_args(args, sys.stderr.isatty())
            items = gather(args.texts, args.input, args.input_format, args.text_pair, sys.stdin)
        except InputError as exc:
            print(f"attention-client: {exc}", file=sys.stderr)
            return 2
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
                _heads(client.get_model(args.model))
            else:
                return _analyze(client, args, items, show_bar)
    except AttentionError as exc:
        print(f"attention-client: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outputs written so far are closed and complete
        print("attention-client: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # an output file that cannot be written
        if isinstance(exc, BrokenPipeError):  # output piped into `head` and the like
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"attention-client: {_say(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
