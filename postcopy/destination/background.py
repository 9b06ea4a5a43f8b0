"""The background transfer: pulls every page still missing, in large batches over connections
of its own (DEFAULT_STREAMS, each on a thread), so the migration ends in bounded time. Zero pages (from the source's zero map) go in
first, locally, with UFFDIO_ZEROPAGE; data pages follow in address order, a few batches in
flight at once. Demand fetches never wait for it: they have their own connections, and the
tracker keeps the two from fetching the same readahead window twice.

Each stream runs on a thread of its own with a blocking connection (client.SyncPageConnection),
not on the event loop, claiming its batches from the one tracker: a batch then costs one recv into a reused buffer, one decode and one
UFFDIO_COPY per run, and the kernel work (recv, UFFDIO_COPY) runs without the GIL, beside the
vCPU threads. Measured here, that is about half the CPU time per MiB of an aiohttp reader on
the loop (docs/performance.md).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Sequence

from postcopy.destination.client import SyncPageConnection
from postcopy.destination.install import Installer
from postcopy.destination.pages import Arrival
from proto import PageRequest

log = logging.getLogger("postcopy.background")
# 1 MiB a request, two in flight: the source builds the next batch while this one installs, and
# a batch is received, decoded, verified and installed while it is still in this CPU's cache (the
# L2 here is 1 MiB a core). Measured side by side (2026-11-25): 15-18% faster than 512-page
# batches 4 deep, whose 8 MiB in flight went through memory four times; larger batches or more
# in flight alone gained nothing since (docs/performance.md, stream).
DEFAULT_BATCH_PAGES = 256
DEFAULT_DEPTH = 2
# Two streams, a thread each: one's recv overlaps the other's UFFDIO_COPY (both release the GIL).
# Measured side by side (docs/performance.md): ~10% more MiB/s than one, and steadier.
DEFAULT_STREAMS = 2
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
    try:
        while not tracker.all_present.is_set() and not stop.is_set():
            while len(pending) < depth:
                page = tracker.next_missing(position)
                if page < 0:
                    page = tracker.next_missing(0) if position else -1
                    if page < 0:
                        break
                region = memory.region_of(memory.page_gpa(page))
                n = tracker.claim(page, min(batch_pages, region.first_page + region.pages - page))
                position = page + max(n, 1)
                if position >= tracker.npages:
                    position = 0
                if not n:
                    continue
                if tracker.is_zero(page):
                    installer.install_zero(page, n)
                    continue
                pending.append((page, n, connection.send(memory.page_gpa(page), n, "background")))
            if not pending:
                # The rest is in flight elsewhere: wake when it is in (the transfer ends
                # then, not up to IDLE_WAIT_S later) or look again after IDLE_WAIT_S.
                tracker.all_present.wait(IDLE_WAIT_S)
                tracker.check_complete()  # the private fault loops' pages are counted only here
                continue
            page, n, request = pending[0]
            batch = connection.receive(request)
            pending.popleft()
            installer.install_batch(batch, Arrival.BACKGROUND)
    finally:
        for page, n, _ in pending:
            tracker.release(page, n)


async def run_background(connections: Sequence[SyncPageConnection], installer: Installer, *,
                         batch_pages: int = DEFAULT_BATCH_PAGES, depth: int = DEFAULT_DEPTH) -> None:
    """``transfer`` on a thread per connection, all pulling from the one tracker (a batch is
    claimed by one of them); cancelling this stops them at their next batch (closing a
    connection ends one blocked in recv), and it returns only once every thread has. Two
    streams overlap one's recv with the other's UFFDIO_COPY (both release the GIL): the
    installs no longer wait for the socket."""
    stop = threading.Event()
    tasks = [asyncio.ensure_future(asyncio.to_thread(transfer, c, installer, stop, batch_pages=batch_pages, depth=depth))
             for c in connections]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # the first error, if any, ends them all (finally)
        await asyncio.gather(*tasks)
    finally:
        # Stopped, not cancelled: a cancelled task's thread would go on installing pages (until
        # its next batch, or until its connection is closed under its recv) after this returned,
        # and its owner then unmaps RAM and closes the uffd. Each ends at its next batch.
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
