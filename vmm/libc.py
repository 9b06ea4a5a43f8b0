"""ctypes bindings to the few libc calls the VMM makes directly.

ioctl here serves the VMM's setup and state ioctls (argument structures by reference, errno
from ctypes). The fault path's three ioctls (KVM_RUN, UFFDIO_COPY, UFFDIO_ZEROPAGE) go through
fcntl.ioctl instead, a third of the cost of a ctypes call; both release the GIL during the call.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
from collections.abc import Callable

libc = ctypes.CDLL(None, use_errno=True)

ioctl = libc.ioctl
ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
ioctl.restype = ctypes.c_int

mmap = libc.mmap
mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
mmap.restype = ctypes.c_void_p
munmap = libc.munmap
munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
munmap.restype = ctypes.c_int
madvise = libc.madvise
madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
madvise.restype = ctypes.c_int
fallocate = libc.fallocate
fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
fallocate.restype = ctypes.c_int
mincore = libc.mincore
mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
mincore.restype = ctypes.c_int

pthread_kill = libc.pthread_kill
pthread_kill.argtypes = [ctypes.c_ulong, ctypes.c_int]
pthread_kill.restype = ctypes.c_int
pthread_sigmask = libc.pthread_sigmask
pthread_sigmask.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
pthread_sigmask.restype = ctypes.c_int

sigtimedwait = libc.sigtimedwait
sigtimedwait.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
sigtimedwait.restype = ctypes.c_int

syscall = libc.syscall
syscall.restype = ctypes.c_long

prctl = libc.prctl
prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
prctl.restype = ctypes.c_int

PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x20, 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_DONTNEED = 4
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
SIG_BLOCK, SIG_UNBLOCK = 0, 1
SYS_rt_tgsigqueueinfo = 297  # x86-64
SYS_gettid = 186
PR_SET_PDEATHSIG = 1


class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class sigset_t(ctypes.Structure):
    _fields_ = [("val", ctypes.c_ulong * 16)]  # glibc's 1024-bit sigset_t

    @classmethod
    def of(cls, *signals: int) -> "sigset_t":
        s = cls()
        for sig in signals:
            s.val[(sig - 1) // 64] |= 1 << ((sig - 1) % 64)
        return s


class siginfo_t(ctypes.Structure):
    """The head of siginfo_t that SIGBUS uses: si_addr sits at offset 16 on x86-64."""
    _fields_ = [("si_signo", ctypes.c_int), ("si_errno", ctypes.c_int), ("si_code", ctypes.c_int),
                ("_pad0", ctypes.c_int), ("si_addr", ctypes.c_uint64), ("_rest", ctypes.c_char * 104)]


assert ctypes.sizeof(siginfo_t) == 128

BUS_ADRERR = 2
BUS_MCEERR_AR = 4


def check(ret: int, what: str) -> int:
    """Raise OSError with ``what`` in the message when a libc call returned -1."""
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def checked_ioctl(fd: int, request: int, arg: object, what: str, error: type[Exception]) -> int:
    """ioctl that raises ``error(message, errno)`` naming ``what`` and the kernel's error. A call
    a signal interrupted (EINTR) is made again, as Python does for its own system calls (PEP
    475): KVM_CREATE_VM, for one, fails so while a profiler or debugger is attached. Not for
    KVM_RUN, whose EINTR means a kick (vcpu.py calls it directly)."""
    while True:
        ret = ioctl(fd, request, arg)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise error(f"{what}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})", err)


def gettid() -> int:
    return int(syscall(SYS_gettid))


def map_fd(fd: int, size: int, offset: int = 0, *, writable: bool) -> memoryview:
    """``size`` bytes of ``fd`` from ``offset``, mapped shared, as a memoryview (read-only
    unless ``writable``) for the life of the process. Unlike Python's mmap it keeps no
    duplicate of ``fd``: a process that must hold no descriptor but its own can map and close."""
    prot = PROT_READ | (PROT_WRITE if writable else 0)
    address = mmap(None, size, prot, MAP_SHARED, fd, offset)
    if address in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {size} bytes of fd {fd} at {offset}: {os.strerror(err)}")
    view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
    return view if writable else view.toreadonly()


def ends_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` for a child that must not outlive the thread starting it: the kernel
    sends the child SIGTERM when that thread ends, its process killed even by SIGKILL
    (PR_SET_PDEATHSIG, kept across exec), so a killed bench or demo leaves no VMM running its
    guest on the host. The parent's pid is read here, before the fork: a parent gone before
    the prctl would never send the signal, so the child kills itself (SIGKILL: before exec it
    still has its parent's signal handlers, and nothing of its own to clean up). Between fork
    and exec the child makes only these C calls (no import, no lock)."""
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec
