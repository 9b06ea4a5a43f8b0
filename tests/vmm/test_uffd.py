"""vmm.uffd against a real userfaultfd.

No test reads a missing page of a registered range in the test process: that would kill it
(SIGBUS) or hang it. Faults that must kill are taken in a child process; the classic-mode test
blocks a helper thread only, and closing the uffd releases it if the test fails.
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from procs import REPO, child_env  # type: ignore[import-not-found]
from vmm import libc
from vmm.abi import userfaultfd as abi
from vmm.uffd import PAGE_SIZE, Uffd, UffdError

pytestmark = pytest.mark.usefixtures("uffd_available")

NPAGES = 16
HANDLER_TIMEOUT_S = 5.0


class Region:
    """A private anonymous mapping, as guest RAM is; unmapped at the end of the test."""

    def __init__(self, npages: int) -> None:
        self.size = npages * PAGE_SIZE
        self.hva = libc.mmap(None, self.size, libc.PROT_READ | libc.PROT_WRITE,
                             libc.MAP_PRIVATE | libc.MAP_ANONYMOUS, -1, 0)
        assert self.hva not in (None, libc.MAP_FAILED)

    def page(self, index: int) -> int:
        return self.hva + index * PAGE_SIZE

    def resident(self) -> list[bool]:
        """Which pages are present, without touching any (mincore)."""
        vec = (ctypes.c_ubyte * (self.size // PAGE_SIZE))()
        libc.check(libc.mincore(self.hva, self.size, vec), "mincore")
        return [bool(b & 1) for b in vec]

    def read(self, index: int, length: int = PAGE_SIZE) -> bytes:
        """Only for pages known to be present."""
        return ctypes.string_at(self.page(index), length)

    def close(self) -> None:
        libc.munmap(self.hva, self.size)


def _pages(*fills: int) -> ctypes.Array[ctypes.c_char]:
    """A source buffer of len(fills) pages, page i filled with byte fills[i]."""
    data = b"".join(bytes([f]) * PAGE_SIZE for f in fills)
    return ctypes.create_string_buffer(data, len(data))


@pytest.fixture
def region() -> Iterator[Region]:
    r = Region(NPAGES)
    yield r
    r.close()


@pytest.fixture
def uffd(region: Region) -> Iterator[Uffd]:
    u = Uffd(abi.UFFD_FEATURE_SIGBUS)
    u.register(region.hva, region.size)
    yield u
    u.close()


# -- handshake and registration -------------------------------------------------------------

def test_handshake_offers_sigbus_and_grants_it_when_asked() -> None:
    offered = Uffd.available_features()
    assert offered & abi.UFFD_FEATURE_SIGBUS
    with Uffd(abi.UFFD_FEATURE_SIGBUS) as u:
        assert u.fd >= 0
        assert u.features & abi.UFFD_FEATURE_SIGBUS
        assert u.ioctls & (1 << 0x3F)  # UFFDIO_API itself
        assert u.ioctls & (1 << 0x00) and u.ioctls & (1 << 0x01)  # REGISTER, UNREGISTER
    assert u.fd == -1


def test_handshake_refuses_an_unknown_feature() -> None:
    with pytest.raises(UffdError, match="UFFDIO_API") as info:
        Uffd(1 << 62)
    assert info.value.errno == errno.EINVAL


def test_register_anonymous_memory_offers_copy_zeropage_and_wake(region: Region) -> None:
    with Uffd(abi.UFFD_FEATURE_SIGBUS) as u:
        ioctls = u.register(region.hva, region.size)
        for nr in (0x02, 0x03, 0x04):  # WAKE, COPY, ZEROPAGE
            assert ioctls & (1 << nr), f"ioctl {nr:#x} not offered for the range: {ioctls:#x}"


def test_register_an_unaligned_range_raises_uffd_error_naming_it(region: Region) -> None:
    with Uffd() as u, pytest.raises(UffdError, match=f"UFFDIO_REGISTER\\({region.hva + 1:#x}"):
        u.register(region.hva + 1, PAGE_SIZE)


# -- installing pages -----------------------------------------------------------------------

def test_copy_installs_a_multi_page_run_that_reads_back(region: Region, uffd: Uffd) -> None:
    src = _pages(*range(1, 9))
    assert uffd.copy(region.page(4), ctypes.addressof(src), 8 * PAGE_SIZE) == 8 * PAGE_SIZE
    resident = region.resident()
    assert resident[4:12] == [True] * 8
    assert not any(resident[:4]) and not any(resident[12:])
    for i in range(8):
        assert region.read(4 + i) == bytes([i + 1]) * PAGE_SIZE


def test_zeropage_installs_a_run_that_reads_zero(region: Region, uffd: Uffd) -> None:
    assert uffd.zeropage(region.page(0), 5 * PAGE_SIZE) == 5 * PAGE_SIZE
    assert all(region.resident()[:5]) and not any(region.resident()[5:])
    assert region.read(0, 5 * PAGE_SIZE) == bytes(5 * PAGE_SIZE)


@pytest.mark.parametrize("existing", [0, 2, 4], ids=["first", "middle", "last"])
def test_copy_over_an_existing_page_skips_it_and_installs_the_rest(region: Region, uffd: Uffd, existing: int) -> None:
    old = _pages(0xEE)
    assert uffd.copy(region.page(existing), ctypes.addressof(old), PAGE_SIZE) == PAGE_SIZE
    new = _pages(0x10, 0x11, 0x12, 0x13, 0x14)
    existed: list[int] = []
    installed = uffd.copy(region.page(0), ctypes.addressof(new), 5 * PAGE_SIZE, existed=existed)
    assert installed == 4 * PAGE_SIZE and existed == [existing * PAGE_SIZE]
    assert region.resident()[:5] == [True] * 5
    for i in range(5):
        want = 0xEE if i == existing else 0x10 + i
        assert region.read(i) == bytes([want]) * PAGE_SIZE, f"page {i}"


def test_page_copier_installs_one_page_skips_an_existing_one_and_names_other_errors(region: Region, uffd: Uffd) -> None:
    copier = uffd.page_copier()
    first, second = _pages(0x21), _pages(0x22)
    assert copier.copy(region.page(3), ctypes.addressof(first)) == PAGE_SIZE
    assert copier.copy(region.page(3), ctypes.addressof(second)) == 0  # EEXIST: the first stays
    assert copier.copied == 1
    assert region.read(3) == bytes([0x21]) * PAGE_SIZE and region.resident()[:5] == [False, False, False, True, False]
    with pytest.raises(UffdError, match=f"UFFDIO_COPY\\({region.page(1) + 1:#x}") as e:
        copier.copy(region.page(1) + 1, ctypes.addressof(first))  # unaligned
    assert e.value.errno == errno.EINVAL


def test_copy_over_existing_pages_only_installs_nothing(region: Region, uffd: Uffd) -> None:
    src = _pages(1, 2)
    assert uffd.copy(region.page(0), ctypes.addressof(src), 2 * PAGE_SIZE) == 2 * PAGE_SIZE
    again = _pages(9, 9)
    assert uffd.copy(region.page(0), ctypes.addressof(again), 2 * PAGE_SIZE) == 0
    assert region.read(0) == bytes([1]) * PAGE_SIZE and region.read(1) == bytes([2]) * PAGE_SIZE


def test_zeropage_over_an_existing_page_skips_it_and_installs_the_rest(region: Region, uffd: Uffd) -> None:
    src = _pages(0x77)
    uffd.copy(region.page(1), ctypes.addressof(src), PAGE_SIZE)
    existed: list[int] = []
    assert uffd.zeropage(region.page(0), 3 * PAGE_SIZE, existed=existed) == 2 * PAGE_SIZE and existed == [PAGE_SIZE]
    assert region.read(1) == bytes([0x77]) * PAGE_SIZE
    assert region.read(0) == bytes(PAGE_SIZE) and region.read(2) == bytes(PAGE_SIZE)


def test_copy_into_an_unregistered_range_raises_uffd_error_naming_the_ioctl(uffd: Uffd) -> None:
    other = Region(1)
    try:
        src = _pages(1)
        with pytest.raises(UffdError, match="UFFDIO_COPY") as info:
            uffd.copy(other.hva, ctypes.addressof(src), PAGE_SIZE)
        assert info.value.errno is not None and info.value.errno != errno.EEXIST
    finally:
        other.close()


def test_a_copy_that_fails_partway_says_how_far_it_got(region: Region, uffd: Uffd) -> None:
    """A source whose last two pages are unmapped: the kernel copies the first two, then the
    run fails with EFAULT. The error says what is present, so the caller can count it."""
    src = Region(4)
    try:
        for i in range(4):
            ctypes.memset(src.page(i), i + 1, PAGE_SIZE)
        libc.munmap(src.page(2), 2 * PAGE_SIZE)
        with pytest.raises(UffdError, match="UFFDIO_COPY") as info:
            uffd.copy(region.page(0), src.hva, 4 * PAGE_SIZE)
        assert info.value.errno == errno.EFAULT
        assert (info.value.installed, info.value.reached) == (2 * PAGE_SIZE, 2 * PAGE_SIZE)
        assert region.resident()[:4] == [True, True, False, False]
        assert region.read(0) == bytes([1]) * PAGE_SIZE and region.read(1) == bytes([2]) * PAGE_SIZE
    finally:
        libc.munmap(src.hva, 2 * PAGE_SIZE)


def test_a_copy_that_fails_partway_counts_pages_it_skipped_as_reached_not_installed(region: Region, uffd: Uffd) -> None:
    """Page 0 exists already: the run skips it, copies page 1, then fails at page 2."""
    uffd.copy(region.page(0), ctypes.addressof(_pages(9)), PAGE_SIZE)
    src = Region(4)
    try:
        libc.munmap(src.page(2), 2 * PAGE_SIZE)
        existed: list[int] = []
        with pytest.raises(UffdError) as info:
            uffd.copy(region.page(0), src.hva, 4 * PAGE_SIZE, existed=existed)
        assert (info.value.installed, info.value.reached, existed) == (PAGE_SIZE, 2 * PAGE_SIZE, [0])
    finally:
        libc.munmap(src.hva, 2 * PAGE_SIZE)


# -- faults in SIGBUS mode, in a child process ------------------------------------------------

_CHILD = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from vmm import libc
    from vmm.abi import userfaultfd as abi
    from vmm.uffd import PAGE_SIZE, Uffd
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    mode = sys.argv[1]
    size = 4 * PAGE_SIZE
    hva = libc.mmap(None, size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS, -1, 0)
    uffd = Uffd(abi.UFFD_FEATURE_SIGBUS)
    uffd.register(hva, size)
    if mode == "unregister":
        uffd.unregister(hva, size)
    elif mode == "copy":
        src = ctypes.create_string_buffer(b"Z" * PAGE_SIZE, PAGE_SIZE)
        uffd.copy(hva + PAGE_SIZE, ctypes.addressof(src), PAGE_SIZE)
    print("registered", flush=True)
    seen = []
    t = threading.Thread(target=lambda: seen.append(ctypes.string_at(hva + PAGE_SIZE + 8, 8)))
    t.start()
    t.join()
    print("read", seen[0].hex(), flush=True)
""")


def _child(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _CHILD, mode], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=30)


def test_thread_touching_a_missing_page_in_sigbus_mode_dies_with_sigbus() -> None:
    proc = _child("missing")
    assert "registered" in proc.stdout, proc.stderr
    assert "read" not in proc.stdout
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr)


def test_thread_touching_a_copied_page_in_sigbus_mode_reads_it() -> None:
    proc = _child("copy")
    assert proc.returncode == 0, proc.stderr
    assert "read " + (b"Z" * 8).hex() in proc.stdout


def test_after_unregister_a_missing_page_faults_in_normally_as_zero() -> None:
    proc = _child("unregister")
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert "read " + bytes(8).hex() in proc.stdout


# -- classic mode: a blocked thread woken by copy ---------------------------------------------

class Toucher:
    """A thread that reads 8 bytes at ``address``; ctypes.memmove drops the GIL while it
    blocks in the fault, so the handler (this test) keeps running."""

    def __init__(self, address: int, write: bool = False) -> None:
        self.buf = ctypes.create_string_buffer(b"\x5a" * 8, 8)
        self.address = address
        self.write = write
        self.thread = threading.Thread(target=self._touch, daemon=True)
        self.thread.start()

    def _touch(self) -> None:
        if self.write:
            ctypes.memmove(self.address, self.buf, 8)
        else:
            ctypes.memmove(self.buf, self.address, 8)


def _read_fault(u: Uffd) -> abi.uffd_msg:
    poller = select.poll()
    poller.register(u.fd, select.POLLIN)
    assert poller.poll(HANDLER_TIMEOUT_S * 1000), "no fault message within the timeout"
    data = os.read(u.fd, ctypes.sizeof(abi.uffd_msg))
    assert len(data) == ctypes.sizeof(abi.uffd_msg)
    return abi.uffd_msg.from_buffer_copy(data)


@pytest.fixture
def classic(region: Region) -> Iterator[Uffd]:
    u = Uffd(0)  # no SIGBUS: faults wait for the handler
    u.register(region.hva, region.size)
    yield u
    u.close()  # releases any thread still blocked in a fault


def test_classic_fault_reports_the_page_and_is_woken_by_copy(region: Region, classic: Uffd) -> None:
    toucher = Toucher(region.page(3) + 0x10)
    msg = _read_fault(classic)
    assert msg.event == abi.UFFD_EVENT_PAGEFAULT
    assert msg.arg.pagefault.address == region.page(3)
    assert not msg.arg.pagefault.flags & abi.UFFD_PAGEFAULT_FLAG_WRITE
    assert toucher.thread.is_alive(), "the toucher did not wait for its page"
    src = ctypes.create_string_buffer(bytes(range(256)) * (PAGE_SIZE // 256), PAGE_SIZE)
    assert classic.copy(region.page(3), ctypes.addressof(src), PAGE_SIZE) == PAGE_SIZE
    toucher.thread.join(HANDLER_TIMEOUT_S)
    assert not toucher.thread.is_alive(), "copy did not wake the faulting thread"
    assert toucher.buf.raw == bytes(range(0x10, 0x18))


def test_classic_write_fault_is_flagged_as_a_write(region: Region, classic: Uffd) -> None:
    toucher = Toucher(region.page(7), write=True)
    msg = _read_fault(classic)
    assert msg.event == abi.UFFD_EVENT_PAGEFAULT and msg.arg.pagefault.address == region.page(7)
    assert msg.arg.pagefault.flags & abi.UFFD_PAGEFAULT_FLAG_WRITE
    assert classic.zeropage(region.page(7), PAGE_SIZE) == PAGE_SIZE
    toucher.thread.join(HANDLER_TIMEOUT_S)
    assert not toucher.thread.is_alive()
    assert region.read(7, 16) == b"\x5a" * 8 + bytes(8)


def test_classic_copy_with_dontwake_leaves_the_thread_waiting_until_wake(region: Region, classic: Uffd) -> None:
    toucher = Toucher(region.page(5))
    assert _read_fault(classic).arg.pagefault.address == region.page(5)
    src = _pages(0x42)
    assert classic.copy(region.page(5), ctypes.addressof(src), PAGE_SIZE, abi.UFFDIO_COPY_MODE_DONTWAKE) == PAGE_SIZE
    time.sleep(0.2)
    assert toucher.thread.is_alive(), "DONTWAKE woke the faulting thread"
    classic.wake(region.page(5), PAGE_SIZE)
    toucher.thread.join(HANDLER_TIMEOUT_S)
    assert not toucher.thread.is_alive(), "UFFDIO_WAKE did not wake the faulting thread"
    assert toucher.buf.raw == b"\x42" * 8
