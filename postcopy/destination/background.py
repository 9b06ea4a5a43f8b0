"""The background transfer: pulls every page still missing, in large batches over its own
connection, so the migration ends in bounded time. Zero pages (from the source's zero map) go in
first, locally, with UFFDIO_ZEROPAGE; data pages follow in address order, a few batches in
flight at once. Demand fetches never wait for it: they have their own connections, and the
tracker keeps the two from fetching the same readahead window twice."""
from __future__ import annotations

import asyncio
import collections
import logging

from postcopy.destination.client import PageConnection
from postcopy.destination.install import Installer
from postcopy.destination.pages import Arrival

log = logging.getLogger("postcopy.background")
DEFAULT_BATCH_PAGES = 256
DEFAULT_DEPTH = 4
ZERO_RUN_PAGES = 1 << 16


async def install_zero_pages(installer: Installer) -> int:
    tracker = installer.tracker
    done = 0
    for first, count in tracker.zero_runs():
        page, end = first, first + count
        while page < end:
            n = tracker.claim(page, min(ZERO_RUN_PAGES, end - page))
            if n:
                installer.install_zero(page, n)
                done += n
                await asyncio.sleep(0)  # let demand traffic on this loop go first
            page += max(n, 1)
    return done


async def run_background(connection: PageConnection, installer: Installer, *,
                         batch_pages: int = DEFAULT_BATCH_PAGES, depth: int = DEFAULT_DEPTH) -> None:
    tracker = installer.tracker
    memory = installer.memory
    await install_zero_pages(installer)
    pending: collections.deque[tuple[int, int, asyncio.Future]] = collections.deque()
    position = 0
    while not tracker.all_present.is_set():
        while len(pending) < depth:
            page = tracker.next_missing(position)
            if page < 0:
                page = tracker.next_missing(0) if position else -1
                if page < 0:
                    break
            region = memory.region_of(memory.page_gpa(page))
            limit = min(batch_pages, region.first_page + region.pages - page)
            n = tracker.claim(page, limit)
            position = page + max(n, 1)
            if position >= tracker.npages:
                position = 0
            if not n:
                continue
            if tracker.is_zero(page):
                installer.install_zero(page, n)
                continue
            pending.append((page, n, connection.submit(memory.page_gpa(page), n, "background")))
        if not pending:
            # Everything left is in flight on a vCPU's connection: wait for it to land.
            await asyncio.sleep(0.0005)
            continue
        page, n, future = pending.popleft()
        try:
            batch = await future
        except BaseException:
            tracker.release(page, n)
            for p, m, f in pending:
                f.cancel()
                tracker.release(p, m)
            raise
        installer.install_batch(batch, Arrival.BACKGROUND)
