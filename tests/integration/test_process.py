"""The real commands as users run them: the server process and its shutdown,
and the client SDK installed alone in a fresh environment."""

import re
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.request

import grpc
import pytest

from attention_client import AttentionClient, AttentionError
from tests.helpers import ROOT, ServerProcess, wait_until


def metric(proc: ServerProcess, sample: str) -> float:
    """One sample of the server's Prometheus endpoint (its port is in the log); 0 when absent."""
    port = wait_until(lambda: re.search(r"metrics on http://[^:]+:(\d+)/", proc.stderr()), timeout=30)
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def inflight_calls(proc: ServerProcess) -> int:
    """attention.v1 calls in flight."""
    return int(metric(proc, 'attention_inflight_requests{service="attention.v1.AttentionService"}'))


def queued_sequences(proc: ServerProcess) -> int:
    """Sequences waiting for a runtime batch."""
    return int(metric(proc, 'attention_queue_depth{model="minilm-l6"}'))


@pytest.mark.slow
def test_sigterm_drains_in_flight_calls_then_exits_cleanly():
    texts = ["word " * 400] * 6
    # A stream computes at most one result ahead of what its caller has read (a 46 MB result is over
    # the 1 MiB window): when the signal comes, four of the six sequences are not even submitted yet.
    with ServerProcess("--stream-window-mib", "1", "--grace-period", "30") as proc, \
            AttentionClient(proc.target, timeout=120) as client:
        stream = client.analyze_stream(texts, top_k=1)
        first = next(stream)
        wait_until(lambda: inflight_calls(proc) == 1, timeout=30)
        proc.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert [r.index for r in [first, *rest]] == list(range(6))
        assert proc.proc.wait(60) == 0
        err = proc.stderr()
        assert "shutting down" in err and "stopped" in err
        with pytest.raises(AttentionError) as refused:
            client.analyze("after shutdown", timeout=5)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.slow
def test_sigterm_finishes_queued_calls_and_refuses_new_ones():
    texts = ["word " * 300] * 3
    # The batcher holds sequences for company (max-queue-delay) until a batch is full: 12 x 302
    # tokens fill neither 64 sequences nor 4096 tokens, so every sequence is still queued when
    # the signal comes, and the drain (which stops waiting for company) computes them.
    with ServerProcess("--grace-period", "60", "--instances", "1", "--max-queue-delay-ms", "600000",
                       "--max-batch-size", "64", "--max-batch-tokens", "4096") as proc:
        with AttentionClient(proc.target, timeout=120) as client:
            results, errors = [], []

            def call(i):
                try:
                    results.append(client.analyze_batch(texts, top_k=1, attention=False,
                                                        ids=[f"{i}-{k}" for k in range(3)]))
                except AttentionError as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            wait_until(lambda: queued_sequences(proc) == 12 and inflight_calls(proc) == 4, timeout=60)
            proc.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "draining" in proc.stderr(), timeout=30)  # the server has seen the signal
            with pytest.raises(AttentionError) as refused:  # refused while draining, or gone once stopped
                client.analyze("too late", timeout=30)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            for t in threads:
                t.join(120)
        assert not errors and len(results) == 4 and all(len(r) == 3 for r in results)
        assert sorted(r.id for call in results for r in call) == sorted(f"{i}-{k}" for i in range(4) for k in range(3))
        assert proc.proc.wait(60) == 0


def test_unary_and_concurrent_callers_share_one_process():
    with ServerProcess() as proc, AttentionClient(proc.target, timeout=120) as client:
        results, errors = [], []

        def call(i):
            try:
                results.append(client.analyze(f"caller {i} asks about heads", top_k=1))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and len(results) == 8


@pytest.mark.slow
def test_client_sdk_installs_and_works_without_server_dependencies(tmp_path, server):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "requirements" / "constraints.txt"),
         str(ROOT / "client")], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    script = textwrap.dedent(f"""
        import importlib.util, json
        from importlib.metadata import distributions
        for heavy in ("onnxruntime", "torch", "transformers", "tokenizers", "attention_server", "grpc_tools"):
            assert importlib.util.find_spec(heavy) is None, heavy
        from attention_client import AttentionClient
        from attention_client.viz import head_view_html
        with AttentionClient("{server.target}", timeout=60) as c:
            r = c.analyze("The cat sat.", top_k=1)
            assert "The cat sat" not in head_view_html(r)[:200] and len(head_view_html(r)) > 5000
        names = sorted(d.metadata["Name"].lower() for d in distributions())
        print(json.dumps({{"shape": list(r.attention.shape), "packages": names}}))
    """)
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    import json

    out = json.loads(done.stdout)
    assert out["shape"] == [6, 12, 6, 6]
    assert set(out["packages"]) <= {"attention-client", "grpcio", "protobuf", "numpy", "pip", "setuptools",
                                    "typing_extensions", "typing-extensions"}
