"""A user's code type-checked with `mypy --strict` against the SDK: a misspelt option or
result attribute, a wrong literal, a batch given to analyze are errors; correct use is clean."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[2] / "client"

GOOD = '''
import asyncio

import numpy as np
import numpy.typing as npt

from attention_client import (AnalyzeResult, AsyncAttentionClient, AttentionClient, AttentionError,
                              InvalidArgumentError, ModelInfo, UnavailableError)


def use(client: AttentionClient) -> float:
    r: AnalyzeResult = client.analyze("The cat sat.", top_k=3, layers=[0, 1], heads=range(4),
                                      attention_dtype="float16", rollout="mean", exclude_special_tokens=True,
                                      word_level=True, head_statistics=True, min_strength=0.1, timeout=5.0,
                                      metadata=[("x-request-id", "abc")])
    pair = client.analyze("Where?", text_pair="Here.", hidden_states=False)
    ids = client.analyze([101, 7592, 102]) if pair.id == "" else client.analyze(np.array([101, 102]))
    batch: list[AnalyzeResult] = client.analyze_batch(["a", "b"], ids=["x", "y"], text_pairs=[None, "c"])
    streamed = [s.index for s in client.analyze_stream(["a", [101, 102]], top_k=1)]
    info: ModelInfo = client.get_model()
    total = float(len(batch) + len(streamed) + info.max_batch_size + len(ids.tokens))
    if r.attention is not None:
        matrix: npt.NDArray[np.floating] = r.head_attention(0, 1)
        total += float(r.attention.sum()) + float(matrix.max())
    for row in r.pair_rows():
        layer, head, frm, to, strength = row
        total += strength
    return total


async def use_async(target: str) -> int:
    async with AsyncAttentionClient(target, timeout=10) as client:
        r = await client.analyze("x", top_k=1)
        rs = await client.analyze_batch(["x", "y"])
        n = len([s async for s in client.analyze_stream(["x"])])
        return len(r.tokens) + len(rs) + n


def handle() -> str:
    try:
        with AttentionClient("localhost:50051") as client:
            return str(use(client)) + str(asyncio.run(use_async("localhost:50051")))
    except InvalidArgumentError as exc:
        return exc.details
    except UnavailableError as exc:
        return f"{exc.retryable} {exc.request_id}"
    except AttentionError as exc:
        return f"{exc.code.name} {exc.details} {exc.request_id} {exc.retryable}"
'''

BAD = '''
from attention_client import AttentionClient

client = AttentionClient()
r = client.analyze("x", topk=3)  # E: misspelt option
r.attentoin  # E: misspelt attribute
client.analyze("x", attention_dtype="int8")  # E: not a dtype
client.analyze("x", rollout="median")  # E: not a fusion
client.analyze(["a", "b"])  # E: a batch given to analyze
client.analyze(("a", "b"))  # E: a tuple is no text pair
client.analyze("x", layers=0)  # E: not a list of layers
many = client.analyze_batch(["a", "b"])
many.attention  # E: a list, not a result
'''


@pytest.mark.slow
def test_mypy_strict_catches_misuse_and_accepts_correct_use(tmp_path):
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "bad.py").write_text(BAD)
    # MYPYPATH: the SDK's source (an editable install is invisible to mypy; a wheel is found as installed)
    env = {**os.environ, "MYPYPATH": str(CLIENT)}
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--cache-dir",
                           str(tmp_path / "cache"), "good.py", "bad.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "No module named mypy" not in done.stderr, "mypy is a dev dependency: pip install mypy"
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert not [e for e in errors if e.startswith("good.py")], done.stdout
    expected = {k + 1 for k, line in enumerate(BAD.splitlines()) if "# E:" in line}
    lines = {int(m.group(1)) for e in errors if (m := re.match(r"bad\.py:(\d+):", e))}
    assert lines == expected, done.stdout
    assert 'Unexpected keyword argument "topk"' in done.stdout
    assert '"AnalyzeResult" has no attribute "attentoin"' in done.stdout
