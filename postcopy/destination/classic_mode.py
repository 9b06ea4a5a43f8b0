"""Fault mode `classic`: plain userfaultfd (MISSING mode), built as the best classic handler we
know, because it is both the fallback and the baseline the exit mode is measured against.

A vCPU that touches a missing page sleeps in the kernel until a handler thread installs the page
with a wake-up. Placement is what makes this fast (HOST.md: a wake-up across CPUs costs ~55 us
per fault): the vCPUs are pinned, and there is one handler thread per CPU they run on, pinned to
it, each with its own blocking connection to the page source. A handler reads one message at
a time (MSG_SIZE says why) and installs its page (plus its readahead) with one fetch and one
UFFDIO_COPY. ``naive()`` gives what most implementations ship: one unpinned handler.

Blocktime: uffd is opened with UFFD_FEATURE_THREAD_ID, so each message names the faulting
thread (``feat.ptid``); a fault is recorded against that vCPU from the read of its message to
the wake of its page. Each handler thread writes its own logs (one writer per FaultLog);
``fault_logs()`` merges them. Faults of threads that are not vCPUs (none expected) go to vCPU -1.
"""
from __future__ import annotations

import ctypes
import logging
import os
import select
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from postcopy.destination import private_loop
from postcopy.destination.install import Installer
from postcopy.destination.pages import MISSING, Arrival
from postcopy.destination.readahead import Readahead
from postcopy.observe.faultlog import UFFD_KIND, FaultLog, merge_logs
from proto import PageBatch
from vmm.abi.userfaultfd import UFFD_EVENT_PAGEFAULT, uffd_msg
from vmm.guest.layout import PAGE_SHIFT, PAGE_SIZE
from vmm.uffd import PageCopier, Uffd, UffdError
from vmm.vcpu import VcpuThread

log = logging.getLogger("postcopy.classic")
# One message a read. Reading up to 64 and serving them as contiguous runs paged in 7-8% slower
# at 2 and 4 vCPUs here (shared loop, 32 MiB; equal at 1 vCPU), and C's handlers 10-19% slower
# (docs/performance.md, pagein): a handler that takes two vCPUs' faults serves them one after
# the other and wakes the second across CPUs, where the handler beside it would have taken it.
MSG_SIZE = ctypes.sizeof(uffd_msg)
# struct uffd_msg read as qwords: the event is the low byte of qword 0, pagefault.address qword 2.
EVENT_QWORD, ADDRESS_QWORD, PTID_QWORD = 0, 2, 3
PTID_MASK = 0xFFFFFFFF
UNKNOWN_VCPU = -1
STOP_JOIN_S = 5.0
PAGE_MASK = ~(PAGE_SIZE - 1)
DEMAND = Arrival.DEMAND  # an enum member read through its class costs a descriptor call


class PageSource(Protocol):
    """A blocking connection to the page source (SyncPageConnection, or the bench's local one)."""

    def fetch(self, gpa: int, count: int, kind: str) -> PageBatch: ...

    def fetch_page(self, gpa: int) -> int | PageBatch: ...

    def close(self) -> None: ...


def vcpu_cpus(nvcpus: int) -> list[int]:
    """The host CPU each vCPU is pinned to: round robin over the CPUs this process may use."""
    cpus = sorted(os.sched_getaffinity(0))
    return [cpus[i % len(cpus)] for i in range(nvcpus)]


def handler_cpus(nvcpus: int) -> list[int]:
    """One handler per CPU that runs a vCPU."""
    return sorted(set(vcpu_cpus(nvcpus)))


def cpu_beside(cpu: int | None) -> int | None:
    """The CPU after ``cpu`` among those this process may use, for a thread that should not
    take its vCPU's CPU (a scan's prefetcher); None if ``cpu`` is None or it is the only one."""
    cpus = sorted(os.sched_getaffinity(0))
    if cpu is None or cpu not in cpus or len(cpus) < 2:
        return None
    return cpus[(cpus.index(cpu) + 1) % len(cpus)]


def place_vcpus(threads: list[VcpuThread]) -> list[int]:
    """Pin each vCPU thread (when it starts) as vcpu_cpus says; returns the handler CPUs."""
    for thread, cpu in zip(threads, vcpu_cpus(len(threads))):
        thread.cpu = cpu
    return handler_cpus(len(threads))


class _Handler:
    """One handler thread's own things: its CPU, connection, window, message buffer, counts."""

    def __init__(self, cpu: int | None, connection: PageSource, readahead: Readahead) -> None:
        self.cpu = cpu
        self.connection: PageSource | None = connection
        self.readahead = readahead
        self.msg_size = MSG_SIZE
        self.buf = bytearray(MSG_SIZE)  # one message a read
        self.qwords = memoryview(self.buf).cast("Q")
        self.faults = 0
        self.logs: dict[int, FaultLog] = {}  # vCPU -> faults this thread served for it
        self.copier: PageCopier | None = None  # this thread's one-page UFFDIO_COPY (wakes)
        self.last_tid, self.last_log = -1, None  # ClassicHandler._log_of's one-entry cache
        self.thread: threading.Thread | None = None
        # Its loop in a private interpreter, where it serves one page a fault (private_loop.py)
        self.private: private_loop.PrivateHandler | None = None

    def fault_tid(self) -> int:
        """The faulting thread of the message read."""
        return self.qwords[PTID_QWORD] & PTID_MASK

    def log(self, vcpu: int) -> FaultLog:
        fl = self.logs.get(vcpu)
        if fl is None:
            fl = self.logs[vcpu] = FaultLog()
        return fl


class ClassicHandler:
    """Serves the uffd's page faults on handler threads; ``start``/``stop`` from any thread."""

    def __init__(self, uffd: Uffd, installer: Installer, connections: list[PageSource], *,
                 cpus: list[int | None], readahead_base: int, readahead_max: int,
                 vcpus: Sequence[VcpuThread] = (),
                 private_loops: bool = True) -> None:
        if len(connections) != len(cpus) or not cpus:
            raise ValueError(f"classic handler: {len(connections)} connections for {len(cpus)} handler CPUs")
        self.uffd = uffd
        self.installer = installer
        self.tracker = installer.tracker
        self.memory = installer.memory
        self.handlers = [_Handler(cpu, conn, Readahead(readahead_base, readahead_max))
                         for cpu, conn in zip(cpus, connections)]
        for h in self.handlers:
            h.copier = installer.page_copier()
        self._vcpus = vcpus
        self._vcpu_of_tid: dict[int, int] = {}
        # Guest RAM as one region (the usual layout): a message's page and gpa by arithmetic.
        one = self.memory.regions[0]
        self._hva_lo, self._hva_hi = (one.hva, one.hva + one.size) if len(self.memory.regions) == 1 else (0, 0)
        self._hva_page, self._hva_gpa = one.first_page - (one.hva >> PAGE_SHIFT), one.gpa - one.hva
        self.error: BaseException | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # One page a fault is served in a private interpreter per handler thread where one can
        # be had (private_loop.PrivateHandler): two handlers then do not share one GIL.
        self.private_loops = private_loops and private_loop.unavailable() is None

    @property
    def stop_fd(self) -> int:
        """The stop pipe's read end: readable once stop() was called."""
        return self._stop_r

    def hva_layout(self) -> tuple[int, int, int, int]:
        """Guest RAM as one region: its first and end host address, and what turns a host address
        into a page (page = hva_page + hva >> PAGE_SHIFT) and a gpa (gpa = hva + hva_gpa); the
        first two are 0 where RAM is in several regions."""
        return self._hva_lo, self._hva_hi, self._hva_page, self._hva_gpa

    @classmethod
    def naive(cls, uffd: Uffd, installer: Installer, connection: PageSource, *,
              readahead_base: int, readahead_max: int, vcpus: Sequence[VcpuThread] = ()) -> ClassicHandler:
        """One handler thread anywhere, under the process's GIL: the usual implementation."""
        return cls(uffd, installer, [connection], cpus=[None], readahead_base=readahead_base,
                   readahead_max=readahead_max, vcpus=vcpus, private_loops=False)

    def private_loop_count(self) -> int:
        """How many handler threads serve their faults in a private interpreter."""
        return sum(h.private is not None for h in self.handlers)

    @property
    def faults(self) -> int:
        return sum(h.faults for h in self.handlers)

    def fault_logs(self) -> dict[int, FaultLog]:
        """Every served fault by vCPU, merged over the handler threads (read between faults)."""
        return merge_logs([h.logs for h in self.handlers], (t.id for t in self._vcpus))

    def _log_of(self, h: _Handler, tid: int) -> FaultLog:
        """The log of the vCPU thread ``tid``, for handler ``h`` (the last one found is kept: a
        handler pinned beside one vCPU serves that vCPU's faults one after another)."""
        if tid == h.last_tid:
            return h.last_log  # type: ignore[return-value]
        vcpu = self._vcpu_of(tid)
        fl = h.log(vcpu)
        if vcpu != UNKNOWN_VCPU:  # a thread not known yet may be a vCPU that just started
            h.last_tid, h.last_log = tid, fl
        return fl

    def _vcpu_of(self, tid: int) -> int:
        vcpu = self._vcpu_of_tid.get(tid)
        if vcpu is None:  # a vCPU thread learns its tid when it starts: look again
            self._vcpu_of_tid = {t.tid: t.id for t in self._vcpus if t.tid}
            vcpu = self._vcpu_of_tid.get(tid, UNKNOWN_VCPU)
        return vcpu

    def start(self) -> None:
        for i, h in enumerate(self.handlers):
            h.private = self._private_handler(h)
            h.thread = threading.Thread(target=self._main, args=(h,), name=f"uffd-handler{i}", daemon=True)
            h.thread.start()

    def _private_handler(self, h: _Handler) -> private_loop.PrivateHandler | None:
        """A private interpreter's loop for handler ``h`` where it fetches from a connection it
        can read itself and RAM is one region; else None (the shared loop)."""
        if not self.private_loops or h.connection is None or h.copier is None:
            return None
        if not self._hva_lo or not private_loop.can_read(h.connection):
            return None
        return private_loop.start(lambda private: private_loop.PrivateHandler(self, h, private),
                                  "a classic handler", h.cpu)

    def stop(self) -> None:
        if self._stop_w < 0:
            return  # closed already
        os.write(self._stop_w, b"x")  # stays readable: every handler sees it
        for h in self.handlers:
            if h.thread is not None:
                h.thread.join(STOP_JOIN_S)

    def close(self) -> None:
        """Stop the handlers and close their connections and the stop pipe (idempotent)."""
        if self._stop_w < 0:
            return
        self.stop()
        for h in self.handlers:
            if h.connection is not None:
                h.connection.close()
                h.connection = None
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._stop_r = self._stop_w = -1

    # -- a handler thread ---------------------------------------------------------------------
    def _main(self, h: _Handler) -> None:
        if h.cpu is not None:
            os.sched_setaffinity(0, {h.cpu})  # 0: this thread
        if h.private is not None:
            try:
                h.private.run()
            except BaseException as e:  # noqa: BLE001 - a handler must report, never vanish
                log.error("classic handler: %s", e)
                self.error = e
            return
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        fd, buf, stop_r = self.uffd.fd, [h.buf], self._stop_r
        poll, readv, monotonic_ns = poller.poll, os.readv, time.monotonic_ns
        # The usual read with one page a fault (no readahead: the page-in bench's case), one
        # message for a missing data page in single-region RAM, is served in this frame, as
        # exit mode's _run serves its usual fault: _page, _install, Installer.install_page and
        # the fault log's record inlined, each marked with its original (which keeps serving
        # every other read). Per fault, the handler's Python is on the vCPU's path: the two
        # share a CPU.
        q, tracker = h.qwords, self.tracker
        state, zero, mark_created = tracker.state, tracker.zero_bitmap, tracker.mark_created
        hva_lo, hva_hi, hva_page, hva_gpa = self._hva_lo, self._hva_hi, self._hva_page, self._hva_gpa
        one_page = h.readahead.max == 1 and h.connection is not None and h.copier is not None
        fetch_page = h.connection.fetch_page if one_page else None  # type: ignore[union-attr]
        copier = h.copier
        copy, install_page = copier.copy, self.installer.install_page  # type: ignore[union-attr]
        try:
            while True:
                for ready, _ in poll():
                    if ready == stop_r:
                        return
                try:
                    readv(fd, buf)  # one whole message
                except BlockingIOError:
                    continue  # another handler read it
                t0 = monotonic_ns()
                if one_page:
                    address = q[ADDRESS_QWORD]
                    # _page, inlined
                    if q[EVENT_QWORD] & 0xFF == UFFD_EVENT_PAGEFAULT and hva_lo <= address < hva_hi:
                        page = hva_page + (address >> PAGE_SHIFT)
                        # _install's one-page case, inlined
                        if state[page] == MISSING and not zero[page >> 3] >> (page & 7) & 1:
                            h.faults += 1
                            hva = address & PAGE_MASK
                            data = fetch_page(hva + hva_gpa)  # type: ignore[misc]
                            # Installer.install_page for one data page, inlined; anything else
                            # (a batch, a failed copy) goes to it whole
                            made = -1
                            if type(data) is int:
                                try:
                                    made = copy(hva, data)  # 0: EEXIST, counted by its maker
                                except UffdError:
                                    pass  # install_page tries again and says what it is
                            if made < 0:
                                install_page(page, hva, data, DEMAND, copier)  # type: ignore[arg-type]
                            elif made:
                                mark_created(page, DEMAND)
                            # _log_of's cached case and FaultLog.record, inlined (latency last)
                            tid = q[PTID_QWORD] & PTID_MASK
                            fl = h.last_log if tid == h.last_tid else self._log_of(h, tid)
                            fl.t_ns.append(t0)  # type: ignore[union-attr]
                            fl.kind.append(UFFD_KIND)  # type: ignore[union-attr]
                            fl.latency_ns.append(monotonic_ns() - t0)  # type: ignore[union-attr]
                            continue
                self._serve(h, t0)
        except BaseException as e:  # noqa: BLE001 - a handler must report, never vanish
            log.error("classic handler: %s", e)
            self.error = e

    def _serve(self, h: _Handler, t0: int) -> None:
        """Serve the message read: a fault on a page of guest RAM, or nothing."""
        q = h.qwords
        address = q[ADDRESS_QWORD]
        page = self._page(q[EVENT_QWORD], address)
        if page >= 0:
            h.faults += 1
            self._install(h, page, address & PAGE_MASK)
            self._log_of(h, h.fault_tid()).record(t0, UFFD_KIND, time.monotonic_ns() - t0)

    def _page(self, event: int, address: int) -> int:
        """The page a uffd message faults on, or -1 (another event, or outside guest RAM)."""
        if event & 0xFF != UFFD_EVENT_PAGEFAULT:
            return -1
        if self._hva_lo <= address < self._hva_hi:
            return self._hva_page + (address >> PAGE_SHIFT)
        page = self.memory.page_of_hva(address)
        if page < 0:
            log.error("uffd fault at host address %#x outside guest RAM", address)
        return page

    def _install(self, h: _Handler, page: int, hva: int) -> None:
        """Make the faulting ``page`` (at host address ``hva``) present, with its window, and
        wake whoever sleeps on it."""
        tracker = self.tracker
        if tracker.is_present(page):
            # Installed after the fault was queued (the installer woke it then, or it came
            # with DONTWAKE from elsewhere): wake whoever still sleeps on it.
            self.uffd.wake(hva, PAGE_SIZE)
            return
        if tracker.is_zero(page):
            self.installer.install_zero(page, 1)
            return
        if h.readahead.max == 1 and tracker.state[page] == MISSING:
            # One page a fault, no window to size or claim (the page-in bench's case).
            gpa = hva + self._hva_gpa if self._hva_lo <= hva < self._hva_hi else self.memory.page_gpa(page)
            data = h.connection.fetch_page(gpa)  # type: ignore[union-attr]
            self.installer.install_page(page, hva, data, DEMAND, h.copier)
            return
        window = h.readahead.window(page)
        extra = tracker.claim_readahead(page, window) if window > 1 else 0
        try:
            batch = h.connection.fetch(self.memory.page_gpa(page), 1 + extra, "demand")  # type: ignore[union-attr]
        except BaseException:
            tracker.release(page + 1, extra)
            raise
        self.installer.install_batch(batch, Arrival.READAHEAD, first_how=Arrival.DEMAND)
        h.readahead.fetched(page, 1 + extra)
