"""Fault mode `classic`: the baseline and the fallback. uffd in plain MISSING mode; a vCPU that
touches a missing page sleeps in the kernel while the handler on the destination's event loop
reads the fault (add_reader on the uffd fd), fetches the page over its own connection and
installs it with a wake-up."""
from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import time
from array import array

from postcopy.destination.client import FetchError, PageConnection
from postcopy.destination.install import Installer
from postcopy.destination.pages import Arrival
from postcopy.destination.readahead import Readahead
from vmm.abi.userfaultfd import UFFD_EVENT_PAGEFAULT, uffd_msg
from vmm.guest.layout import PAGE_SIZE
from vmm.uffd import Uffd

log = logging.getLogger("postcopy.classic")
MSGS_PER_READ = 64
MSG_SIZE = ctypes.sizeof(uffd_msg)


class ClassicHandler:
    def __init__(self, uffd: Uffd, installer: Installer, connection: PageConnection, *,
                 readahead_base: int, readahead_max: int) -> None:
        self.uffd = uffd
        self.installer = installer
        self.tracker = installer.tracker
        self.memory = installer.memory
        self.connection = connection
        self.readahead = Readahead(readahead_base, readahead_max)
        self._buf = bytearray(MSG_SIZE * MSGS_PER_READ)
        self._msgs = (uffd_msg * MSGS_PER_READ).from_buffer(self._buf)
        self._inflight: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.faults = 0
        self.latency_ns = array("Q")
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
        now = time.perf_counter_ns()
        for msg in self._msgs[: n // MSG_SIZE]:
            if msg.event != UFFD_EVENT_PAGEFAULT:
                continue
            gpa = self.memory.gpa_of_hva(msg.arg.pagefault.address & ~(PAGE_SIZE - 1))
            if gpa is None:
                log.error("uffd fault at host address %#x outside guest RAM", msg.arg.pagefault.address)
                continue
            page = self.memory.page_index(gpa)
            self.faults += 1
            if page in self._inflight:
                continue
            self._inflight.add(page)
            task = asyncio.get_running_loop().create_task(self._serve(page, now))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, page: int, t0: int) -> None:
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
            self.latency_ns.append(time.perf_counter_ns() - t0)
        except FetchError as e:
            log.error("classic handler: %s", e)
            self.error = e
        finally:
            self._inflight.discard(page)
