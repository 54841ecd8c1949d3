import subprocess
import sys
import textwrap


def test_tune_malloc_applies_in_a_glibc_process():
    # In a child process: mallopt changes process-wide state.
    script = textwrap.dedent("""
        import platform
        from attention_client import tune_malloc
        assert tune_malloc() is (platform.libc_ver()[0] == "glibc")
        big = [bytearray(5 << 20) for _ in range(3)]  # still allocates fine
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
