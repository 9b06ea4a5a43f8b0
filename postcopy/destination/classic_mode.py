"""Fault mode `classic`: the baseline and the fallback. uffd in plain MISSING mode; a vCPU that
touches a missing page sleeps in the kernel while the handler on the destination's event loop
reads the fault (add_reader on the uffd fd), fetches the page over its own connection and
installs it with a wake-up.

Blocktime: uffd is opened with UFFD_FEATURE_THREAD_ID, so each message names the faulting
thread (``feat.ptid``); a fault is recorded against that vCPU from the message to the wake of
its page. Faults of threads that are not vCPUs (none expected) go to vCPU -1."""
from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import time
from collections.abc import Sequence

from postcopy.destination.client import FetchError, PageConnection
from postcopy.destination.install import Installer
from postcopy.destination.pages import Arrival
from postcopy.destination.readahead import Readahead
from postcopy.observe.faultlog import UFFD_KIND, FaultLog
from vmm.abi.userfaultfd import UFFD_EVENT_PAGEFAULT, uffd_msg
from vmm.guest.layout import PAGE_SIZE
from vmm.uffd import Uffd
from vmm.vcpu import VcpuThread

log = logging.getLogger("postcopy.classic")
MSGS_PER_READ = 64
MSG_SIZE = ctypes.sizeof(uffd_msg)
UNKNOWN_VCPU = -1


class ClassicHandler:
    def __init__(self, uffd: Uffd, installer: Installer, connection: PageConnection, *,
                 readahead_base: int, readahead_max: int, vcpus: Sequence[VcpuThread] = ()) -> None:
        self.uffd = uffd
        self.installer = installer
        self.tracker = installer.tracker
        self.memory = installer.memory
        self.connection = connection
        self.readahead = Readahead(readahead_base, readahead_max)
        self._buf = bytearray(MSG_SIZE * MSGS_PER_READ)
        self._msgs = (uffd_msg * MSGS_PER_READ).from_buffer(self._buf)
        # page -> the faults waiting for it, flat: vcpu, t_ns, vcpu, t_ns, ...
        self._inflight: dict[int, list[int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._vcpus = vcpus
        self._vcpu_of_tid: dict[int, int] = {}
        self.logs: dict[int, FaultLog] = {t.id: FaultLog() for t in vcpus}
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.uffd.fd, self._on_readable)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.uffd.fd)
        for task in self._tasks:
            task.cancel()

    def _on_readable(self) -> None:
        try:
            n = os.readv(self.uffd.fd, [self._buf])
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return
            raise
        now = time.monotonic_ns()
        for msg in self._msgs[: n // MSG_SIZE]:
            if msg.event != UFFD_EVENT_PAGEFAULT:
                continue
            gpa = self.memory.gpa_of_hva(msg.arg.pagefault.address & ~(PAGE_SIZE - 1))
            if gpa is None:
                log.error("uffd fault at host address %#x outside guest RAM", msg.arg.pagefault.address)
                continue
            page = self.memory.page_index(gpa)
            vcpu = self._vcpu_of(msg.arg.pagefault.ptid)
            waiters = self._inflight.get(page)
            if waiters is not None:  # another vCPU, or the same one again, waits for this page
                waiters.append(vcpu)
                waiters.append(now)
                continue
            self._inflight[page] = [vcpu, now]
            task = asyncio.get_running_loop().create_task(self._serve(page))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _vcpu_of(self, tid: int) -> int:
        vcpu = self._vcpu_of_tid.get(tid)
        if vcpu is None:  # a vCPU thread learns its tid when it starts: look again
            self._vcpu_of_tid = {t.tid: t.id for t in self._vcpus if t.tid}
            vcpu = self._vcpu_of_tid.get(tid, UNKNOWN_VCPU)
        return vcpu

    def _record_woken(self, waiters: list[int]) -> None:
        """Each fault that waited for a page just installed (and woken) ends now."""
        now = time.monotonic_ns()
        for i in range(0, len(waiters), 2):
            vcpu, t0 = waiters[i], waiters[i + 1]
            log_ = self.logs.get(vcpu)
            if log_ is None:
                log_ = self.logs[vcpu] = FaultLog()
            log_.record(t0, UFFD_KIND, now - t0)

    async def _serve(self, page: int) -> None:
        served = False
        try:
            tracker = self.tracker
            if tracker.is_present(page):
                # Installed (maybe with DONTWAKE elsewhere) after the fault was queued: wake.
                gpa = self.memory.page_gpa(page)
                self.uffd.wake(self.memory.hva(gpa, PAGE_SIZE), PAGE_SIZE)
            elif tracker.is_zero(page):
                self.installer.install_zero(page, 1)
            else:
                extra = tracker.claim_readahead(page, self.readahead.window(page))
                try:
                    batch = await self.connection.submit(self.memory.page_gpa(page), 1 + extra, "demand")
                except BaseException:
                    tracker.release(page + 1, extra)
                    raise
                self.installer.install_batch(batch, Arrival.READAHEAD, first_how=Arrival.DEMAND)
                self.readahead.fetched(page, 1 + extra)
            served = True
        except FetchError as e:
            log.error("classic handler: %s", e, extra={"event": "fetch_error", "page": page})
            self.error = e
        finally:
            waiters = self._inflight.pop(page)
            if served:
                self._record_woken(waiters)
