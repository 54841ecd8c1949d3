import subprocess
import sys

from tests.helpers import ROOT

GEN = ROOT / "tools" / "gen_proto.py"


def test_check_fails_when_proto_changes(tmp_path):
    proto = tmp_path / "proto"
    (proto / "attention" / "v1").mkdir(parents=True)
    source = (ROOT / "proto" / "attention" / "v1" / "attention.proto").read_text()
    changed = source.replace("message ListModelsRequest {}", "message ListModelsRequest { string filter = 1; }")
    assert changed != source
    (proto / "attention" / "v1" / "attention.proto").write_text(changed)
    for extra in (ROOT / "proto").rglob("*.proto"):
        target = proto / extra.relative_to(ROOT / "proto")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(extra.read_text())
    done = subprocess.run([sys.executable, str(GEN), "--check", "--proto-dir", str(proto)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "stale: attention/v1/attention_pb2.py" in done.stderr
