"""The shared-memory registry on its own (no model, no server): names, keys,
bounds, and a region's descriptor kept open while a call uses it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from attention_server.errors import Code, FailedPrecondition, InvalidArgument, ServiceError
from attention_server.services.shared_memory import SharedMemoryRegistry


@pytest.fixture
def shm_dir(tmp_path: Path) -> Path:
    (tmp_path / "obj").write_bytes(bytes(range(256)) * 16)  # 4096 bytes
    return tmp_path


def _registry(directory: Path, **limits: int) -> SharedMemoryRegistry:
    return SharedMemoryRegistry(True, directory=directory, **limits)


def _open_fds(path: Path) -> int:
    return sum(1 for fd in os.listdir("/proc/self/fd") if _target(fd) == str(path))


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def test_register_status_use_unregister(shm_dir: Path) -> None:
    registry = _registry(shm_dir)
    registry.register("r", "/obj", 256, 1024)
    assert [(s.name, s.key, s.offset, s.byte_size) for s in registry.status()] == [("r", "/obj", 256, 1024)]
    with registry.use("r", 16, 4, "input 'x'") as region:
        assert region.read(16, 4) == bytes([16, 17, 18, 19])  # region offset 256 + 16 = byte 272 = 16
        region.write(0, [b"\xff\xfe"])
    assert (shm_dir / "obj").read_bytes()[256:258] == b"\xff\xfe"
    registry.unregister("r")
    assert registry.status() == [] and _open_fds(shm_dir / "obj") == 0


def test_a_region_in_use_stays_open_until_the_call_ends(shm_dir: Path) -> None:
    registry = _registry(shm_dir)
    registry.register("r", "obj", 0, 4096)
    with registry.use("r", 0, 8, "output 'y'") as region:
        registry.unregister()  # all
        assert registry.status() == [] and _open_fds(shm_dir / "obj") == 1
        region.write(0, [b"12345678"])
        registry.close()
    assert _open_fds(shm_dir / "obj") == 0
    assert (shm_dir / "obj").read_bytes()[:8] == b"12345678"


@pytest.mark.parametrize("key", ["/../obj", "a/b", "..", ".", "/", "", "x" * 256, "obj\0", "ob j", "/dev/shm/obj"])
def test_keys_that_are_not_shm_names_are_refused_before_anything_is_opened(shm_dir: Path, key: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^key: .* is not a POSIX shared-memory name"):
        _registry(shm_dir).register("r", key, 0, 16)


def test_links_and_directories_are_not_opened(shm_dir: Path) -> None:
    (shm_dir / "link").symlink_to(shm_dir / "obj")
    (shm_dir / "dir").mkdir()
    registry = _registry(shm_dir)
    for key in ("link", "dir"):
        with pytest.raises(InvalidArgument, match=f"^key: shared-memory object '{key}' cannot be opened"):
            registry.register("r", key, 0, 16)


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 129])
def test_region_names_are_checked(shm_dir: Path, name: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^name: "):
        _registry(shm_dir).register(name, "obj", 0, 16)


def test_bounds(shm_dir: Path) -> None:
    registry = _registry(shm_dir, max_regions=2, max_region_bytes=2048, max_total_bytes=3000)
    too_big = re.escape("byte_size: 2049 bytes; a region has 1 byte to 2048 bytes (max_shared_memory_region_mib)")
    with pytest.raises(InvalidArgument, match=f"^{too_big}"):
        registry.register("a", "obj", 0, 2049)
    with pytest.raises(InvalidArgument, match="runs past the end of shared-memory object 'obj' \\(4096 bytes\\)"):
        registry.register("a", "obj", 4000, 100)
    registry.register("a", "obj", 0, 2048)
    with pytest.raises(ServiceError, match="already registered") as twice:
        registry.register("a", "obj", 0, 16)
    assert twice.value.code is Code.ALREADY_EXISTS
    with pytest.raises(ServiceError, match="over the 3000 bytes limit") as total:
        registry.register("b", "obj", 0, 1000)
    assert total.value.code is Code.RESOURCE_EXHAUSTED
    registry.register("b", "obj", 0, 900)
    with pytest.raises(ServiceError, match="2 shared memory regions are registered, the limit"):
        registry.register("c", "obj", 0, 1)
    with pytest.raises(InvalidArgument, match="run past the end of region 'b' \\(900 bytes\\)"):
        with registry.use("b", 800, 101, "input 'x'"):
            pass
    registry.close()


def test_off_refuses_everything(shm_dir: Path) -> None:
    registry = SharedMemoryRegistry(False, directory=shm_dir)
    for call in (lambda: registry.register("a", "obj", 0, 16), registry.status, registry.unregister):
        with pytest.raises(FailedPrecondition, match="start it with --shared-memory"):
            call()
