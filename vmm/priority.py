"""A thread's nice value (setpriority(2) on its tid), whether this process may set it back, and
a vCPU thread that runs guest code at a higher nice value for a while (GuestNice).

Raising a nice value is always allowed; lowering it again needs CAP_SYS_NICE or an RLIMIT_NICE
whose ceiling (20 - soft limit) reaches it. So a caller that lowers a thread's priority for a
while asks ``may_set_nice(previous)`` first, or the thread would stay slow for good.
"""
from __future__ import annotations

import ctypes
import functools
import os
import resource
import threading
from pathlib import Path

CAP_SYS_NICE = 23  # linux/capability.h
MAX_NICE = 19  # the lowest priority a nice value gives (setpriority(2): -20 to 19)


def thread_nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def set_thread_nice(tid: int, nice: int) -> None:
    """Set one thread's nice value (PRIO_PROCESS with a tid is that thread alone on Linux)."""
    os.setpriority(os.PRIO_PROCESS, tid, nice)


@functools.cache  # read once: a pause asks it per vCPU, in the downtime (30 us a read here)
def has_cap_sys_nice() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    return False


def may_set_nice(nice: int) -> bool:
    """May this process set a thread's nice value to ``nice`` whatever it is now?"""
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or nice >= 20 - soft or has_cap_sys_nice()


class GuestNice:
    """A vCPU thread that runs guest code at nice ``low`` for a while (the destination's while
    memory is missing; a paused one until it is resumed): back at ``base`` while it does other
    urgent work of its own (``urgent``/``relax`` around it, on the thread itself), and for good
    at ``end`` (from any thread). The lock orders an ``end`` against a thread
    between ``urgent`` and ``relax``, which would otherwise leave it at ``low``."""

    __slots__ = ("tid", "base", "low", "_lock", "_on", "_block")

    def __init__(self, tid: int, base: int, low: int) -> None:
        self.tid, self.base, self.low = tid, base, low
        self._lock = threading.Lock()
        self._on = True
        self._block: ctypes.Array[ctypes.c_int64] | None = None
        set_thread_nice(tid, low)

    def share(self, block: ctypes.Array[ctypes.c_int64] | None) -> None:
        """Mirror this into ``block`` (on, base, low: NICE_BLOCK), for code on the thread that
        cannot take the lock (a private fault loop, postcopy.destination.private_fault_loop).
        Such code calls urgent and relax as ``nice_urgent`` and ``nice_relax`` do: ``end``
        clears ``on`` before it sets ``base``, and a relax that finds ``on`` cleared after it
        set ``low`` sets ``base`` again, so no order of the two leaves the thread at ``low``."""
        with self._lock:
            self._block = block
            if block is not None:
                block[1], block[2] = self.base, self.low
                block[0] = 1 if self._on else 0

    def urgent(self) -> None:
        with self._lock:
            if self._on:
                set_thread_nice(self.tid, self.base)

    def relax(self) -> None:
        with self._lock:
            if self._on:
                set_thread_nice(self.tid, self.low)

    def end(self) -> None:
        with self._lock:
            if self._on:
                self._on = False
                if self._block is not None:
                    self._block[0] = 0  # before the nice value is set: see share
                set_thread_nice(self.tid, self.base)


NICE_BLOCK = 3  # int64s of a shared GuestNice: on, base, low


def nice_urgent(block: ctypes.Array[ctypes.c_int64] | memoryview, tid: int) -> bool:
    """GuestNice.urgent from its shared ``block``; True if it was on (then nice_relax after)."""
    if not block[0]:
        return False
    set_thread_nice(tid, block[1])
    return True


def nice_relax(block: ctypes.Array[ctypes.c_int64] | memoryview, tid: int) -> None:
    """GuestNice.relax from its shared ``block`` (GuestNice.share says why it is safe)."""
    if block[0]:
        set_thread_nice(tid, block[2])
        if not block[0]:  # ended meanwhile: its base may have come before this low
            set_thread_nice(tid, block[1])
