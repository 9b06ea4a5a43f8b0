"""Uffd: a userfaultfd that owns its fd and offers the UFFDIO ioctls as methods.

``copy`` and ``zeropage`` are on the fault path: each ``Uffd`` keeps one preallocated ioctl
argument per thread, so installing a page allocates nothing.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading

from vmm import libc
from vmm.abi import userfaultfd as abi

USERFAULTFD_DEVICE = "/dev/userfaultfd"
PAGE_SIZE = 4096
SYS_userfaultfd = 323  # x86-64; the fallback where /dev/userfaultfd is missing


class UffdError(Exception):
    """A userfaultfd ioctl failed; ``errno`` is the kernel's error number, if any."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err


def _ioctl(fd: int, request: int, arg: object, what: str) -> int:
    return libc.checked_ioctl(fd, request, arg, what, UffdError)


def _open_fd(flags: int) -> int:
    try:
        dev = os.open(USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = libc.syscall(SYS_userfaultfd, flags)
        if fd < 0:
            err = ctypes.get_errno()
            raise UffdError(f"userfaultfd(2): {os.strerror(err)} (needs root or vm.unprivileged_userfaultfd=1)", err)
        return int(fd)
    except PermissionError as e:
        raise UffdError(f"cannot open {USERFAULTFD_DEVICE}: {e.strerror} (needs root or its permissions)", e.errno) from None
    try:
        return _ioctl(dev, abi.USERFAULTFD_IOC_NEW, flags, "USERFAULTFD_IOC_NEW")
    finally:
        os.close(dev)


class _ThreadArgs(threading.local):
    def __init__(self) -> None:
        self.copy = abi.uffdio_copy()
        self.zeropage = abi.uffdio_zeropage()
        self.copy_ref = ctypes.byref(self.copy)
        self.zeropage_ref = ctypes.byref(self.zeropage)


class Uffd:
    """A userfaultfd context after the UFFDIO_API handshake."""

    def __init__(self, features: int = 0, *, nonblocking: bool = True) -> None:
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)  # never UFFD_USER_MODE_ONLY
        self.fd = _open_fd(flags)
        api = abi.uffdio_api(api=abi.UFFD_API, features=features)
        try:
            _ioctl(self.fd, abi.UFFDIO_API, ctypes.byref(api), f"UFFDIO_API(features {features:#x})")
        except UffdError:
            os.close(self.fd)
            raise
        self.features = api.features
        self.ioctls = api.ioctls
        self._args = _ThreadArgs()

    @staticmethod
    def available_features() -> int:
        """The features this kernel offers (a UFFDIO_API handshake asking for none)."""
        probe = Uffd()
        try:
            return probe.features
        finally:
            probe.close()

    def register(self, start: int, length: int, mode: int = abi.UFFDIO_REGISTER_MODE_MISSING) -> int:
        reg = abi.uffdio_register(abi.uffdio_range(start, length), mode)
        _ioctl(self.fd, abi.UFFDIO_REGISTER, ctypes.byref(reg), f"UFFDIO_REGISTER({start:#x}, {length:#x})")
        return reg.ioctls

    def unregister(self, start: int, length: int) -> None:
        rng = abi.uffdio_range(start, length)
        _ioctl(self.fd, abi.UFFDIO_UNREGISTER, ctypes.byref(rng), f"UFFDIO_UNREGISTER({start:#x}, {length:#x})")

    def wake(self, start: int, length: int) -> None:
        rng = abi.uffdio_range(start, length)
        _ioctl(self.fd, abi.UFFDIO_WAKE, ctypes.byref(rng), f"UFFDIO_WAKE({start:#x}, {length:#x})")

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        """UFFDIO_COPY of a page-aligned run; returns the bytes this call installed.

        A page that already exists (EEXIST: another thread installed it first, which is
        normal) is skipped and the rest of the run still goes in."""
        a = self._args
        c = a.copy
        installed = 0
        while length > 0:
            c.dst, c.src, c.len, c.mode, c.copy = dst, src, length, mode, 0
            if libc.ioctl(self.fd, abi.UFFDIO_COPY, a.copy_ref) >= 0:
                return installed + length
            done, advance = self._progress(c.copy, "UFFDIO_COPY", dst, length)
            installed += done
            dst, src, length = dst + advance, src + advance, length - advance
        return installed

    def zeropage(self, start: int, length: int, mode: int = 0) -> int:
        """UFFDIO_ZEROPAGE of a page-aligned run; same convention as ``copy``."""
        a = self._args
        z = a.zeropage
        installed = 0
        while length > 0:
            z.range.start, z.range.len, z.mode, z.zeropage = start, length, mode, 0
            if libc.ioctl(self.fd, abi.UFFDIO_ZEROPAGE, a.zeropage_ref) >= 0:
                return installed + length
            done, advance = self._progress(z.zeropage, "UFFDIO_ZEROPAGE", start, length)
            installed += done
            start, length = start + advance, length - advance
        return installed

    @staticmethod
    def _progress(done: int, what: str, start: int, length: int) -> tuple[int, int]:
        """After a failed UFFDIO_COPY/ZEROPAGE: (bytes installed, bytes to advance), or raise."""
        err = ctypes.get_errno()
        done = max(done, 0)
        if err == errno.EEXIST:
            # `done` bytes went in, then the page at start+done existed: step over it too.
            return done, min(done + PAGE_SIZE, length)
        if err == errno.EAGAIN:
            return done, done  # the mm changed under us: go on from where it stopped
        raise UffdError(f"{what}({start:#x}, {length:#x}): {os.strerror(err)} (errno {errno.errorcode.get(err, err)})", err)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Uffd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
