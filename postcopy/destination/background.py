"""The background transfer: pulls every page still missing, in large batches over its own
connection, so the migration ends in bounded time. Zero pages (from the source's zero map) go in
first, locally, with UFFDIO_ZEROPAGE; data pages follow in address order, a few batches in
flight at once. Demand fetches never wait for it: they have their own connections, and the
tracker keeps the two from fetching the same readahead window twice.

It runs on a thread of its own with a blocking connection (client.SyncPageConnection), not on
the event loop: the kernel work (recv, installs) runs without the GIL, beside the vCPU threads.
Where the kernel has UFFDIO_MOVE, a batch's pages are received straight into a page sink
(sink.py: huge pages), verified there and moved into guest RAM, a 2 MiB huge page at a time
where the batch is aligned to one: no copy of the pages after the socket's, and guest RAM
allocated 2 MiB at a time instead of 4 KiB (docs/performance.md). Batches are one huge page and
start on huge-page boundaries for that. Without UFFDIO_MOVE they are received into the
connection's buffer and installed with UFFDIO_COPY.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

from postcopy.destination.client import SyncPageConnection
from postcopy.destination.install import Installer
from postcopy.destination.pages import Arrival
from postcopy.destination.sink import HUGE_PAGE, PageSink
from proto import PAGE_SIZE, PageRequest
from vmm.abi.userfaultfd import UFFD_FEATURE_MOVE

log = logging.getLogger("postcopy.background")
# One huge page (2 MiB) a request, two in flight: the source builds the next batch while this
# one installs; a batch that is a whole, aligned huge page moves into guest RAM as one.
DEFAULT_BATCH_PAGES = HUGE_PAGE // PAGE_SIZE
DEFAULT_DEPTH = 2
ZERO_RUN_PAGES = 1 << 16
IDLE_WAIT_S = 0.0005  # everything left is in flight on a vCPU's connection


def install_zero_pages(installer: Installer, stop: threading.Event) -> int:
    tracker = installer.tracker
    done = 0
    for first, count in tracker.zero_runs():
        page, end = first, first + count
        while page < end and not stop.is_set():
            n = tracker.claim(page, min(ZERO_RUN_PAGES, end - page))
            if n:
                installer.install_zero(page, n)
                done += n
            page += max(n, 1)
    return done


def transfer(connection: SyncPageConnection, installer: Installer, stop: threading.Event, *,
             batch_pages: int = DEFAULT_BATCH_PAGES, depth: int = DEFAULT_DEPTH) -> None:
    """Until every page is present (or ``stop`` is set); on a fetch error the claims in flight
    are given back and the FetchError propagates."""
    tracker = installer.tracker
    memory = installer.memory
    install_zero_pages(installer, stop)
    pending: collections.deque[tuple[int, int, PageRequest]] = collections.deque()
    position = 0
    sink = PageSink(batch_pages * PAGE_SIZE) if installer.uffd.features & UFFD_FEATURE_MOVE else None
    try:
        while not tracker.all_present.is_set() and not stop.is_set():
            while len(pending) < depth:
                page = tracker.next_missing(position)
                if page < 0:
                    page = tracker.next_missing(0) if position else -1
                    if page < 0:
                        break
                gpa = memory.page_gpa(page)
                region = memory.region_of(gpa)
                # up to the next batch boundary in guest-physical addresses: batches stay aligned
                to_boundary = batch_pages - (gpa // PAGE_SIZE) % batch_pages
                n = tracker.claim(page, min(to_boundary, region.first_page + region.pages - page))
                position = page + max(n, 1)
                if position >= tracker.npages:
                    position = 0
                if not n:
                    continue
                if tracker.is_zero(page):
                    installer.install_zero(page, n)
                    continue
                pending.append((page, n, connection.send(gpa, n, "background")))
            if not pending:
                time.sleep(IDLE_WAIT_S)
                continue
            page, n, request = pending[0]
            batch = connection.receive(request, sink)
            pending.popleft()
            installer.install_batch(batch, Arrival.BACKGROUND, sink=sink)
    finally:
        for page, n, _ in pending:
            tracker.release(page, n)
        if sink is not None:
            sink.close()


async def run_background(connection: SyncPageConnection, installer: Installer, *,
                         batch_pages: int = DEFAULT_BATCH_PAGES, depth: int = DEFAULT_DEPTH) -> None:
    """``transfer`` on a thread; cancelling this stops it at its next batch (closing the
    connection ends one blocked in recv)."""
    stop = threading.Event()
    try:
        await asyncio.to_thread(transfer, connection, installer, stop, batch_pages=batch_pages, depth=depth)
    finally:
        stop.set()
