"""Triton's system shared memory: named regions of POSIX shared-memory objects
that clients on this host register, so that inputs are read from them and
outputs written into them instead of travelling in messages. The registry knows
names, keys, offsets and sizes only; the Open Inference Protocol's parameters
are parsed by oip_codec.py and used by inference.py.

The server never maps a region: it keeps the object's file descriptor and copies
with pread/pwrite. A mapping would fault (SIGBUS, the process dies) when the
object's owner truncates it under the server; a descriptor only gets a short
read. A region stays open while a call uses it: unregistering it (or the server
stopping) takes it out of the registry at once, and its descriptor is closed
when the last call using it is done, never under a copy.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import Code, FailedPrecondition, InvalidArgument, ResourceExhausted, ServiceError, quote

log = logging.getLogger(__name__)

MiB = 1 << 20
# Where glibc's shm_open keeps POSIX shared-memory objects on Linux.
SHM_DIR = Path("/dev/shm")
# A POSIX shared-memory name: an optional leading '/', then one path component of
# portable characters ('.' and '..' excepted), at most NAME_MAX (255) long.
_KEY = re.compile(r"/?[A-Za-z0-9_.:-]{1,255}")
# Region names appear in URLs (/v2/systemsharedmemory/region/{name}/...) and logs.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
OFF = ("shared memory is off on this server; start it with --shared-memory to let clients on its host "
       "register regions")


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


class AlreadyExists(ServiceError):
    code = Code.ALREADY_EXISTS


class RegionNotFound(ServiceError):
    code = Code.NOT_FOUND


@dataclass(frozen=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


class Region:
    """One registered region: `byte_size` bytes at `offset` of the object behind `fd`."""

    def __init__(self, status: RegionStatus, fd: int) -> None:
        self.status = status
        self.fd = fd
        self.users = 0
        self.retired = False

    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` within the region (the caller checked the bounds)."""
        data = os.pread(self.fd, size, self.status.offset + offset)
        if len(data) != size:
            raise FailedPrecondition(f"shared memory region {quote(self.status.name)}: its object "
                                     f"{quote(self.status.key)} is shorter than the region now (truncated by "
                                     "its owner?); register it again")
        return data

    def write(self, offset: int, parts: Sequence[memoryview | bytes]) -> None:
        """`parts` one after the other from `offset` within the region (bounds checked by the caller)."""
        position = self.status.offset + offset
        for part in parts:
            view = memoryview(part).cast("B")
            while view.nbytes:
                written = os.pwrite(self.fd, view, position)
                view = view[written:]
                position += written


class SharedMemoryRegistry:
    """The regions registered with the server, each bounded in size and in number
    (settings: shared_memory, max_shared_memory_regions, max_shared_memory_region_mib,
    max_shared_memory_total_mib). Thread-safe: calls copy in worker threads."""

    def __init__(self, enabled: bool = False, max_regions: int = 64, max_region_bytes: int = 1024 * MiB,
                 max_total_bytes: int = 4096 * MiB, directory: Path = SHM_DIR) -> None:
        self.enabled = enabled
        self.max_regions = max_regions
        self.max_region_bytes = max_region_bytes
        self.max_total_bytes = max_total_bytes
        self.directory = directory
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise FailedPrecondition(OFF)

    # -- the extension's calls -------------------------------------------------------

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Open `key` and keep `byte_size` bytes at `offset` of it as region `name`."""
        self._check_enabled()
        if not _NAME.fullmatch(name):
            raise InvalidArgument("name", f"{quote(name)} is not a region name: 1 to 128 characters of "
                                  "A-Z a-z 0-9 _ . : -, starting with a letter or digit")
        if not _KEY.fullmatch(key) or key.lstrip("/") in (".", ".."):
            raise InvalidArgument("key", f"{quote(key)} is not a POSIX shared-memory name: an optional "
                                  "leading '/' then 1 to 255 characters of A-Z a-z 0-9 _ . : - (no other '/')")
        if byte_size <= 0 or byte_size > self.max_region_bytes:
            raise InvalidArgument("byte_size", f"{byte_size} bytes; a region has 1 byte to "
                                  f"{_size(self.max_region_bytes)} (max_shared_memory_region_mib)")
        if offset < 0:
            raise InvalidArgument("offset", f"must not be negative, got {offset}")
        with self._lock:  # cheap checks first, before the object is opened
            if name in self._regions:
                raise AlreadyExists(f"shared memory region {quote(name)} is already registered; unregister it "
                                    "first")
            self._check_room(byte_size)
        fd = self._open(key, offset, byte_size)
        region = Region(RegionStatus(name, key, offset, byte_size), fd)
        with self._lock:  # checked again: another register may have come in while the object was opened
            try:
                if name in self._regions:
                    raise AlreadyExists(f"shared memory region {quote(name)} is already registered; unregister "
                                        "it first")
                self._check_room(byte_size)
            except ServiceError:
                os.close(fd)
                raise
            self._regions[name] = region
        log.info("registered shared memory region %s: %d bytes at offset %d of %s", quote(name), byte_size,
                 offset, quote(key))

    def _check_room(self, byte_size: int) -> None:
        if len(self._regions) >= self.max_regions:
            raise ResourceExhausted(f"{len(self._regions)} shared memory regions are registered, the limit "
                                    f"(max_shared_memory_regions); unregister one first")
        total = sum(r.status.byte_size for r in self._regions.values())
        if total + byte_size > self.max_total_bytes:
            raise ResourceExhausted(f"registering {byte_size} bytes would hold {(total + byte_size) / MiB:.1f} MiB "
                                    f"of shared memory, over the {_size(self.max_total_bytes)} limit "
                                    "(max_shared_memory_total_mib); unregister regions first")

    def _open(self, key: str, offset: int, byte_size: int) -> int:
        path = self.directory / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise InvalidArgument("key", f"no shared-memory object {quote(key)} exists on the server's host; "
                                  "create it first (shm_open)") from None
        except OSError as exc:
            raise InvalidArgument("key", f"shared-memory object {quote(key)} cannot be opened for reading and "
                                  f"writing: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument("key", f"{quote(key)} is not a shared-memory object")
            if offset + byte_size > st.st_size:
                raise InvalidArgument("byte_size", f"offset {offset} + byte_size {byte_size} runs past the end of "
                                      f"shared-memory object {quote(key)} ({st.st_size} bytes)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unregister(self, name: str = "") -> None:
        """Forget region `name` (every region when empty); an unknown name is not an error,
        as in Triton. Calls using a region go on with it; its descriptor closes after them."""
        self._check_enabled()
        with self._lock:
            if name:
                region = self._regions.pop(name, None)
                gone = [] if region is None else [region]
            else:
                gone, self._regions = list(self._regions.values()), {}
            for region in gone:
                self._retire(region)
        for region in gone:
            log.info("unregistered shared memory region %s", quote(region.status.name))

    def status(self, name: str = "") -> list[RegionStatus]:
        """Region `name` (NOT_FOUND when it is not registered), or every region."""
        self._check_enabled()
        with self._lock:
            if not name:
                return [r.status for r in self._regions.values()]
            region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"no shared memory region {quote(name)} is registered")
        return [region.status]

    def close(self) -> None:
        """At shutdown: every region is forgotten, its descriptor closed once no call uses it."""
        with self._lock:
            gone, self._regions = list(self._regions.values()), {}
            for region in gone:
                self._retire(region)

    def _retire(self, region: Region) -> None:  # under the lock
        region.retired = True
        if region.users == 0:
            os.close(region.fd)

    # -- use by calls -----------------------------------------------------------------

    @contextmanager
    def use(self, name: str, offset: int, byte_size: int, field: str) -> Iterator[Region]:
        """Region `name` for `byte_size` bytes at `offset`, checked against its bounds; it
        stays open until the block ends, whatever unregisters it meanwhile. Errors name
        `field` (e.g. "input 'input_ids'")."""
        self._check_enabled()
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise InvalidArgument(field, f"parameter 'shared_memory_region': no region {quote(name)} is "
                                      "registered")
            size = region.status.byte_size
            if offset + byte_size > size:
                raise InvalidArgument(field, f"parameters 'shared_memory_offset' {offset} + "
                                      f"'shared_memory_byte_size' {byte_size} run past the end of region "
                                      f"{quote(name)} ({size} bytes)")
            region.users += 1
        try:
            yield region
        finally:
            with self._lock:
                region.users -= 1
                if region.retired and region.users == 0:
                    os.close(region.fd)
