import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "attention_server.healthcheck", *args],
                          capture_output=True, text=True, timeout=30)


def test_healthcheck_command_against_a_real_server(server):
    done = _run("--target", server.target)
    assert done.returncode == 0 and done.stdout.strip() == "SERVING"


def test_healthcheck_command_fails_when_nothing_listens(server):
    done = _run("--target", "127.0.0.1:1", "--timeout", "1")
    assert done.returncode == 1 and "unhealthy" in done.stderr
