"""Uffd: a userfaultfd that owns its fd and offers the UFFDIO ioctls as methods.

``copy`` and ``zeropage`` are on the fault path: each ``Uffd`` keeps one preallocated ioctl
argument per thread, so installing a page allocates nothing, and they go through
``fcntl.ioctl`` with that buffer (about half the cost of a ctypes call here; it releases the GIL
too): an error comes back as OSError, whose errno says what to do.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading

from vmm import libc
from vmm.abi import userfaultfd as abi

USERFAULTFD_DEVICE = "/dev/userfaultfd"
PAGE_SIZE = 4096
SYS_userfaultfd = 323  # x86-64; the fallback where /dev/userfaultfd is missing


class UffdError(Exception):
    """A userfaultfd ioctl failed; ``errno`` is the kernel's error number, if any. A failed
    ``Uffd.copy``/``zeropage`` of a run also says how far it got: ``reached`` bytes from the
    run's start are present (``installed`` of them created by this call, the rest found there),
    so its caller can count what it created before the error goes on."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err
        self.installed = 0
        self.reached = 0


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


# struct uffdio_copy {dst, src, len, mode, copy} and uffdio_zeropage {start, len, mode,
# zeropage} as qwords: the last one is what the kernel wrote back (bytes done, or -errno).
COPY_RESULT, ZEROPAGE_RESULT = 4, 3
ioctl = fcntl.ioctl


class _ThreadArgs(threading.local):
    def __init__(self) -> None:
        # (the buffer, the same as qwords): one thread-local lookup per call
        copy = bytearray(ctypes.sizeof(abi.uffdio_copy))
        self.copy = copy, memoryview(copy).cast("Q")
        zeropage = bytearray(ctypes.sizeof(abi.uffdio_zeropage))
        self.zeropage = zeropage, memoryview(zeropage).cast("Q")


def _range_error(what: str, start: int, length: int, err: int) -> UffdError:
    """The error of a UFFDIO_COPY/ZEROPAGE on [start, start + length), naming the kernel's errno."""
    return UffdError(f"{what}({start:#x}, {length:#x}): {os.strerror(err)} (errno {errno.errorcode.get(err, err)})", err)


class PageCopier:
    """UFFDIO_COPY of one page at a time in one mode, for the one thread that owns it (a vCPU's
    fault path): the argument preallocated with its length and mode set, so a fault's install
    is three stores and the ioctl."""

    __slots__ = ("_fd", "_buf", "_q", "copied")

    def __init__(self, fd: int, mode: int) -> None:
        self._fd = fd
        self.copied = 0  # pages this copier installed (its owner's only: no lock)
        self._buf = bytearray(ctypes.sizeof(abi.uffdio_copy))
        self._q = memoryview(self._buf).cast("Q")
        self._q[2], self._q[3] = PAGE_SIZE, mode

    def copy(self, dst: int, src: int) -> int:
        """Install the page at ``src`` at ``dst``; returns PAGE_SIZE, or 0 if it existed
        already (EEXIST: installed by another thread first, which is normal)."""
        q = self._q
        q[0], q[1], q[4] = dst, src, 0
        try:
            ioctl(self._fd, abi.UFFDIO_COPY, self._buf, True)
            self.copied += 1
            return PAGE_SIZE
        except OSError as e:
            if e.errno == errno.EEXIST:
                return 0
            raise _range_error("UFFDIO_COPY", dst, PAGE_SIZE, e.errno) from None


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

    def copy(self, dst: int, src: int, length: int, mode: int = 0, existed: list[int] | None = None) -> int:
        """UFFDIO_COPY of a page-aligned run; returns the bytes this call installed.

        A page that already exists (EEXIST: another thread installed it first, which is
        normal) is skipped and the rest of the run still goes in; its offset in the run is
        appended to ``existed`` if given (who created which page: pages.py counts by it)."""
        buf, q = self._args.copy
        installed, start = 0, dst
        while length > 0:
            q[0], q[1], q[2], q[3], q[4] = dst, src, length, mode, 0
            try:
                ioctl(self.fd, abi.UFFDIO_COPY, buf, True)
                return installed + length
            except OSError as e:
                try:
                    done, advance = self._progress(e.errno, q[COPY_RESULT], "UFFDIO_COPY", dst, length)
                except UffdError as error:
                    error.installed, error.reached = installed, dst - start
                    raise
            if existed is not None and advance > done:
                existed.append(dst + done - start)
            installed += done
            dst, src, length = dst + advance, src + advance, length - advance
        return installed

    def page_copier(self, mode: int = 0) -> PageCopier:
        """A one-page UFFDIO_COPY for one thread (see PageCopier)."""
        return PageCopier(self.fd, mode)

    def zeropage(self, start: int, length: int, mode: int = 0, existed: list[int] | None = None) -> int:
        """UFFDIO_ZEROPAGE of a page-aligned run; same convention as ``copy``."""
        buf, q = self._args.zeropage
        installed, first = 0, start
        while length > 0:
            q[0], q[1], q[2], q[3] = start, length, mode, 0
            try:
                ioctl(self.fd, abi.UFFDIO_ZEROPAGE, buf, True)
                return installed + length
            except OSError as e:
                try:
                    done, advance = self._progress(e.errno, q[ZEROPAGE_RESULT], "UFFDIO_ZEROPAGE", start, length)
                except UffdError as error:
                    error.installed, error.reached = installed, start - first
                    raise
            if existed is not None and advance > done:
                existed.append(start + done - first)
            installed += done
            start, length = start + advance, length - advance
        return installed

    @staticmethod
    def _progress(err: int, result: int, what: str, start: int, length: int) -> tuple[int, int]:
        """After a failed UFFDIO_COPY/ZEROPAGE: (bytes installed, bytes to advance), or raise.
        ``result`` is the copy/zeropage field as the kernel left it (signed)."""
        done = result if result < 1 << 63 else 0  # a negative s64 read as a qword: nothing done
        if err == errno.EEXIST:
            # `done` bytes went in, then the page at start+done existed: step over it too.
            return done, min(done + PAGE_SIZE, length)
        if err == errno.EAGAIN:
            return done, done  # the mm changed under us: go on from where it stopped
        raise _range_error(what, start, length, err)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Uffd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
