"""`attention-client analyze` as people use it, against a fake service (no model): inputs
from the command line, stdin and files; batches split at the server's max_batch_size;
JSON to stdout; one head view per text with a picker page; streams; a progress bar."""

import argparse
import io
import json

import numpy as np
import pytest

from attention_client import cli
from attention_client._cli_input import InputError, gather, parse_lines
from attention_client._cli_output import Item
from tests.unit.fake_service import FakeService

TEXTS = ["the cat sat", "a dog ran home", "birds fly", "fish swim in water", "end"]


@pytest.fixture
def fake():
    with FakeService(max_batch_size=2) as service:
        yield service


def run(fake, *args):
    """cli.main against the fake service; its exit status."""
    return cli.main(["--target", fake.target, "--timeout", "10", *args])


@pytest.fixture
def stdin(monkeypatch):
    def give(text: str) -> None:
        monkeypatch.setattr("sys.stdin", io.StringIO(text))
    return give


# --- help ------------------------------------------------------------------------------------------------------

def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse keeps no public list of its actions
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield parser.prog, action


def test_every_option_and_argument_has_help():
    missing = [(prog, action.dest) for prog, action in _actions(cli._parser()) if not action.help]
    assert not missing


# --- inputs ----------------------------------------------------------------------------------------------------

def test_one_text_per_line_skipping_blank_lines():
    assert parse_lines(["first line\n", "\n", "  \n", "second\r\n"], "in.txt") == [Item("first line"), Item("second")]


def test_json_lines_with_text_pair_and_id():
    lines = ['{"text": "q?", "text_pair": "a.", "id": "x"}\n', "\n", '{"text": "plain", "id": 3, "label": "kept"}']
    assert parse_lines(lines, "in.jsonl") == [Item("q?", "a.", "x"), Item("plain", None, "3")]
    # auto: text unless the first line is a JSON object; forced either way
    assert parse_lines(['{"text": "t"}'], "f", "text") == [Item('{"text": "t"}')]
    assert parse_lines(["{not json"], "f") == [Item("{not json")]


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": ""}', 'in.jsonl:2: "text" must be a non-empty string'),
    ('{"txt": "typo"}', 'in.jsonl:2: "text" must be a non-empty string'),
    ('["a list"]', "in.jsonl:2: a JSON line must be an object"),
    ("not json", "in.jsonl:2: not valid JSON"),
    ('{"text": "x", "text_pair": 5}', 'in.jsonl:2: "text_pair" must be a string or null'),
    ('{"text": "x", "id": [1]}', 'in.jsonl:2: "id" must be a string or an integer'),
])
def test_bad_json_lines_are_named_by_file_and_line(line, message):
    with pytest.raises(InputError, match="^" + message.replace("[", r"\[")):
        parse_lines(['{"text": "ok"}', line], "in.jsonl")


def test_gather_order_stdin_once_and_text_pair():
    stdin = io.StringIO("from stdin\n")
    assert gather(["a", "-", "b"], None, "auto", None, stdin) == [Item("a"), Item("from stdin"), Item("b")]
    with pytest.raises(InputError, match="only once"):
        gather(["-"], "-", "auto", None, io.StringIO(""))
    assert gather(["q"], None, "auto", "a", io.StringIO("")) == [Item("q", "a")]
    with pytest.raises(InputError, match="--text-pair goes with exactly one text"):
        gather(["q", "r"], None, "auto", "a", io.StringIO(""))
    with pytest.raises(InputError, match="no input"):
        gather([], None, "auto", None, io.StringIO("\n\n"))


def test_input_problems_exit_2_before_any_call(fake, tmp_path, capsys, stdin):
    assert run(fake, "analyze", "--input", str(tmp_path / "missing.txt")) == 2
    assert "--input: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 1}\n')
    assert run(fake, "analyze", "--input", str(bad)) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    stdin("")
    assert run(fake, "analyze", "-") == 2
    assert "no input" in capsys.readouterr().err
    assert run(fake, "analyze", "x", "--batch-size", "0") == 2
    assert run(fake, "analyze", "x", "--npz", "-") == 2
    assert fake.requests == []


# --- batches, stdin, outputs -------------------------------------------------------------------------------------

def test_batches_are_split_at_the_servers_max_batch_size(fake, capsys):
    assert run(fake, "analyze", *TEXTS, "--top-k", "1") == 0
    assert [len(r.sequences) for r in fake.requests] == [2, 2, 1]
    assert [s.text for r in fake.requests for s in r.sequences] == TEXTS
    out = capsys.readouterr().out
    assert [line[2:] for line in out.splitlines() if line.startswith("# ")] == TEXTS
    fake.requests.clear()
    assert run(fake, "analyze", *TEXTS, "--batch-size", "1") == 0
    assert [len(r.sequences) for r in fake.requests] == [1] * 5
    fake.requests.clear()
    assert run(fake, "analyze", *TEXTS, "--batch-size", "50") == 0  # never above the server's limit
    assert [len(r.sequences) for r in fake.requests] == [2, 2, 1]


def test_stdin_and_json_to_stdout(fake, capsys, stdin):
    stdin("".join(json.dumps({"text": t, "id": f"id{k}"}) + "\n" for k, t in enumerate(TEXTS)))
    assert run(fake, "analyze", "-", "--json", "-", "--top-k", "2", "--layers", "1") == 0
    out = capsys.readouterr().out
    results = json.loads(out)  # stdout is JSON only: no table, no note
    assert [r["index"] for r in results] == list(range(5)) and [r["id"] for r in results] == [f"id{k}" for k in
                                                                                           range(5)]
    assert [r["text"] for r in results] == TEXTS
    assert np.asarray(results[0]["attention"]).shape == (1, 3, 5, 5) and results[0]["layers"] == [1]


def test_stream_writes_results_as_they_come(fake, tmp_path, capsys):
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    assert run(fake, "analyze", "--input", str(source), "--stream", "--json", str(tmp_path / "r.json")) == 0
    assert fake.methods == ["AnalyzeStream"] * 3
    assert [r["text"] for r in json.loads((tmp_path / "r.json").read_text())] == TEXTS


def test_npz_and_html_for_several_texts(fake, tmp_path, capsys):
    page = tmp_path / "view.html"
    assert run(fake, "analyze", *TEXTS, "--npz", str(tmp_path / "r.npz"), "--html", str(page)) == 0
    with np.load(tmp_path / "r.npz") as npz:
        assert {f"seq{k}_attention" for k in range(5)} <= set(npz.files)
        assert list(npz["seq3_tokens"]) == ["[CLS]", "fish", "swim", "in", "water", "[SEP]"]
    picker = page.read_text()
    pages = [tmp_path / f"view-{k}.html" for k in range(5)]
    assert all(p.is_file() and "Attention head view" in p.read_text() for p in pages)
    for p, text in zip(pages, TEXTS, strict=True):
        assert f'href="{p.name}"' in picker and text in picker
    assert 'target="view"' in picker and '<iframe name="view"' in picker
    assert fake.requests[0].options.word_level and fake.requests[0].options.head_statistics


def test_one_text_one_html_page(fake, tmp_path, capsys):
    page = tmp_path / "one.html"
    assert run(fake, "analyze", "the cat sat", "--text-pair", "on the mat", "--html", str(page)) == 0
    assert "Attention head view" in page.read_text() and list(tmp_path.iterdir()) == [page]
    assert fake.requests[0].sequences[0].text_pair == "on the mat"


def test_a_failure_midway_stops_and_says_how_far(fake, tmp_path, capsys):
    texts = ["one", "two", "three", "!UNAVAILABLE", "five"]
    assert run(fake, "analyze", *texts, "--json", str(tmp_path / "r.json")) == 1
    err = capsys.readouterr().err
    assert "stopped after 2 of 5 texts" in err and "UNAVAILABLE: fake failure (request id fake-" in err
    assert [r["text"] for r in json.loads((tmp_path / "r.json").read_text())] == ["one", "two"]


def test_progress_bar_on_stderr(fake, capsys):
    assert run(fake, "analyze", *TEXTS, "--progress") == 0
    captured = capsys.readouterr()
    assert "5/5" in captured.err and "seq" in captured.err
    assert "5/5" not in captured.out and captured.out.count("# ") == 5
    assert run(fake, "analyze", *TEXTS, "--json", "-", "--progress") == 0
    captured = capsys.readouterr()
    assert "5/5" in captured.err and len(json.loads(captured.out)) == 5  # the bar stays off stdout
    assert run(fake, "analyze", *TEXTS) == 0  # stderr is no terminal here: no bar by default
    assert "5/5" not in capsys.readouterr().err


def test_progress_without_tqdm_says_what_to_install(fake, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_has_tqdm", lambda: False)
    assert run(fake, "analyze", "x", "--progress") == 2
    assert "pip install 'attention-client[cli]'" in capsys.readouterr().err
    assert run(fake, "analyze", "x", "y") == 0  # the bar is optional
