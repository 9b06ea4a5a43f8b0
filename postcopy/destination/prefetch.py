"""A scanning vCPU's readahead, fetched and installed while its guest runs.

In exit mode a vCPU thread fetches what its faults need. A vCPU that scans (exit_mode.py: each
fault where its last window ended) hands the rest of its scan to its Prefetcher: a thread with
a connection of its own that claims the next windows from the tracker (each the vCPU's largest
readahead window), asks for them (DEPTH in flight), and installs each one (UFFDIO_COPY,
DONTWAKE) while the guest walks the one before, so the guest meets installed pages and does
not exit at all. It goes at most AHEAD_PAGES past the vCPU's last fault (it cannot see the
guest between faults); a guest that outruns it faults on a claimed page and waits for its
window (``wait``) rather than fetching it again.

It runs on a CPU other than its vCPU's where the vCPU is pinned (``cpu``): the guest's walk
takes its vCPU's CPU whole, and a prefetcher that lands there slows the walk it feeds
(24 MiB scans alternated, three runs of 8-12 rounds: medians 215 / 257 / 238 k pages/s
unpinned, 264 / 251 / 251 k pinned; docs/performance.md).

Runs of the source's zero map on the way are made here (UFFDIO_ZEROPAGE), so a scan goes on
past them. Claims: only the windows in flight are claimed (IN_FLIGHT), so a scan that stops
leaves no claim once they are installed; a connection that gives up (retry.py) or close() gives them back.
"""
from __future__ import annotations

import collections
import logging
import os
import threading

from postcopy.destination.install import Installer
from postcopy.destination.pages import IN_FLIGHT, PRESENT, Arrival
from postcopy.destination.retry import RetryingSyncConnection
from proto import PAGE_SIZE, PageRequest

log = logging.getLogger("postcopy.prefetch")
DEPTH = 2  # windows in flight: the source builds the next while this thread installs one
# How far past the vCPU's last fault it goes (64 MiB): a guest that walks this far without a
# fault (every page installed in time) faults once here, waits one window, and the scan goes on.
# Every page it fetches is wanted anyway (post-copy), so the bound only limits how long it
# pulls one region ahead of the rest. Measured side by side on a 24 MiB scan: 4096 pages (one
# restart a scan) was ~4% slower (median of 7, the noise on this host is larger).
AHEAD_PAGES = 16384


def answer_bytes(window_max: int) -> int:
    """The receive buffer its connection needs (a window's pages and the batch's framing): a
    connection's buffer is allocated whole as it opens, 8 MiB by default, one per vCPU here."""
    return window_max * PAGE_SIZE + (64 << 10)


class Prefetcher:
    def __init__(self, installer: Installer, connection: RetryingSyncConnection, *, window_max: int,
                 name: str = "prefetch", ahead_pages: int = AHEAD_PAGES, cpu: int | None = None) -> None:
        self.installer = installer
        self.tracker = installer.tracker
        self.connection = connection
        self.window_max = window_max
        self.cpu = cpu  # where its thread runs (None: where the scheduler puts it)
        self.ahead_pages = ahead_pages
        self.failed: BaseException | None = None  # what ended it (the vCPU then fetches alone)
        self.windows = 0  # windows installed
        self._cond = threading.Condition()
        self._pending: collections.deque[tuple[int, int]] = collections.deque()  # claimed: (page, count)
        self._start = self._next = self._horizon = -1  # this scan's first page, next to claim, limit
        self._stop = False
        # A failure after close() ends at once instead of retrying toward a source still up.
        connection.still_wanted = lambda: not self._stop
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- the vCPU thread's side -------------------------------------------------------------
    def reached(self, page: int) -> bool:
        """Is this fault where the scan is: in a window this prefetcher asked for, or at the
        page it would claim next (the guest outran it)? Read without the lock (two ints)."""
        return self._start <= page <= self._next and self.failed is None

    def follow(self, page: int) -> None:
        """The vCPU's scan has its pages up to ``page``: keep AHEAD_PAGES past it (a new scan if
        ``page`` is not this one's). Its windows are full-size from the first: doubling them
        as the vCPU does would have the guest catch up and wait at each (the next window takes
        twice as long to come as this one to walk). Measured side by side on a 24 MiB scan (two
        runs, median of 7): the guest's time in faults 3.1-3.5 -> 2.2 ms; pages/s +0-19%."""
        with self._cond:
            if not self._start <= page <= self._next:
                self._start = self._next = self._horizon = page
            self._horizon = max(self._horizon, min(page + self.ahead_pages, self.tracker.npages))
            self._cond.notify_all()

    def wait(self, page: int) -> bool:
        """Wait for a claimed ``page`` in flight here; False if it is not (someone else's
        claim) or its window was given back (the caller then fetches it)."""
        state = self.tracker.state
        with self._cond:
            while state[page] == IN_FLIGHT and self._holds(page):
                self._cond.wait()
        return state[page] == PRESENT

    def _holds(self, page: int) -> bool:
        return any(first <= page < first + n for first, n in self._pending)

    def close(self) -> None:
        """Stop (its claims in flight given back) and close its connection."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self.connection.close()  # ends a recv in progress
        self._thread.join()
        self.connection.close()  # and a socket a reconnect opened meanwhile

    # -- its own thread ---------------------------------------------------------------------
    def _run(self) -> None:
        if self.cpu is not None:
            try:
                os.sched_setaffinity(0, {self.cpu})  # 0: this thread
            except OSError as e:  # a CPU taken away meanwhile: run where the scheduler puts it
                log.debug("prefetcher not pinned to CPU %d: %s", self.cpu, e)
        requests: collections.deque[PageRequest] = collections.deque()
        memory = self.installer.memory
        try:
            while True:
                window = self._claim(block=not requests)
                if window is None:
                    return
                page, n, zero = window
                if zero:  # a run of the source's zero map: made here, never fetched
                    try:
                        self.installer.install_zero(page, n)
                    except BaseException:
                        self.tracker.release(page, n)
                        raise
                    continue
                if n:
                    requests.append(self.connection.send(memory.page_gpa(page), n, "readahead"))
                    if len(requests) < DEPTH:
                        continue
                if not requests:
                    continue
                batch = self.connection.receive(requests[0])
                requests.popleft()
                self.installer.install_batch(batch, Arrival.READAHEAD)
                with self._cond:
                    self._pending.popleft()
                    self.windows += 1
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - the vCPU fetches alone from here; the claims go back
            if not self._stop:
                log.warning("prefetcher stopped: %s", e)
                self.failed = e
        finally:
            with self._cond:
                for first, n in self._pending:
                    self.tracker.release(first, n)
                self._pending.clear()
                self._horizon = self._next
                self._cond.notify_all()

    def _claim(self, *, block: bool) -> tuple[int, int, bool] | None:
        """The next window, claimed: (page, count, zero): a window to ask for, or a run of the
        source's zero map (zero); count 0 if there is none now and ``block`` is False; None
        once stopped."""
        tracker, memory = self.tracker, self.installer.memory
        with self._cond:
            while not self._stop:
                page = self._next
                if len(self._pending) < DEPTH and page < self._horizon:
                    zero = tracker.is_zero(page)
                    if zero:  # up to its region's end: one UFFDIO_ZEROPAGE
                        region = memory.region_of(memory.page_gpa(page))
                        n = tracker.claim(page, min(region.first_page + region.pages, self._horizon) - page)
                    else:
                        limit = tracker.ahead_run(page, min(self.window_max, self._horizon - page))
                        n = tracker.claim(page, limit) if limit else 0
                    if n:
                        if not zero:
                            self._pending.append((page, n))
                        self._next = page + n
                        return page, n, zero
                    self._horizon = page  # a page that is not MISSING: this scan ends here
                if not block:
                    return page, 0, False
                self._cond.wait()
        return None
