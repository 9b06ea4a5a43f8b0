"""The page tracker: the only code that knows which guest pages are present, in flight or still
wanted. Demand, readahead and background all ask it, so no race has two owners.

Pages are numbered over all memory regions back to back (GuestMemory.page_index). A page goes
MISSING -> (IN_FLIGHT ->) PRESENT, never back but for a failed background fetch, which returns
its claim.

A page is counted once, by the install that created it: the kernel lets exactly one
UFFDIO_COPY or UFFDIO_ZEROPAGE of a page succeed (the others get EEXIST), and every install
says how many pages it created. So the counts by arrival add up to the guest's page count
exactly, and a fault's own page needs no lock to be counted (``mark_created``): the vCPU
threads would otherwise contend for it at every fault.
"""
from __future__ import annotations

import enum
import re
import threading
from collections.abc import Iterator
from typing import Protocol

from vmm.memory import GuestMemory

MISSING, PRESENT, IN_FLIGHT = 0, 1, 2
_MISSING = bytes([MISSING])
_PRESENT = bytes([PRESENT])
_SET_BYTES = re.compile(rb"[^\x00]+")  # zero-map bytes with at least one zero page
_PARTIAL_BYTE = re.compile(rb"[^\xff]")  # ... and not all eight


class Arrival(enum.IntEnum):
    EAGER = 1
    DEMAND = 2
    READAHEAD = 3
    BACKGROUND = 4
    ZERO = 5


ARRIVAL_NAMES = {a: a.name.lower() for a in Arrival}


class _Maker(Protocol):
    made: int
    made_readahead: int

    def publish_zero_map(self, bitmap: bytes, known: bool) -> None: ...


class PageTracker:
    def __init__(self, memory: GuestMemory, zero_bitmap: bytes | None = None) -> None:
        self.memory = memory
        self.npages = memory.pages
        self.state = bytearray(self.npages)
        self.arrival = bytearray(self.npages)
        # The source's zero map as sent (1 bit per page, LSB first): kept packed, because
        # unpacking a 4 GiB guest's map would cost milliseconds of downtime.
        nbytes = (self.npages + 7) // 8
        self.zero_bitmap = bytes(zero_bitmap) if zero_bitmap is not None else bytes(nbytes)
        # Whether zero_bitmap is the source's map, not the empty one it starts with: the
        # private fault loops widen a fault's window only then (private_fault_loop.first_window).
        self.zero_map_known = zero_bitmap is not None
        if len(self.zero_bitmap) != nbytes:
            raise ValueError(f"zero map of {len(self.zero_bitmap)} bytes, guest RAM of {self.npages} pages needs {nbytes}")
        self._counts = dict.fromkeys(Arrival, 0)  # under the lock: what mark_present counted
        self.counted = 0  # their sum (read without the lock by mark_created's completion check)
        # What mark_created counted, without the lock: one byte (the Arrival) per page,
        # appended (one C call, whole under the GIL); summed into counts when they are read.
        self.created = bytearray()
        self._tallied, self._tally = 0, dict.fromkeys(Arrival, 0)  # created[:_tallied], by arrival
        self._lock = threading.Lock()
        self.all_present = threading.Event()
        # Counters of pages made where this interpreter cannot count them: each vCPU's private
        # fault loop (private_fault_loop.Shared.made, written there, read here), of which
        # made_readahead came behind a faulting page in its window and the rest on demand; the
        # last of them is noticed by check_complete.
        self.makers: list[_Maker] = []

    @property
    def present(self) -> int:
        return self.counted + len(self.created) + self._made_elsewhere()

    def _made_elsewhere(self) -> int:
        return sum(m.made for m in self.makers) if self.makers else 0

    def set_zero_map(self, bitmap: bytes) -> None:
        """The source's zero map, come after the resume: one attribute store (a reader sees one
        map or the other), then ``zero_map_known``, then each maker's loop told (it reads the
        map by address, and would see it only at its next entry)."""
        self.zero_bitmap = bitmap
        self.zero_map_known = True
        for maker in list(self.makers):
            maker.publish_zero_map(bitmap, True)

    def check_complete(self) -> bool:
        """Set all_present if every page is present by now, counting the makers' pages (which
        nobody here counts as they come): called by those who wait for it, between waits."""
        if not self.all_present.is_set() and self.makers and self.present == self.npages:
            self.all_present.set()
        return self.all_present.is_set()

    @property
    def counts(self) -> dict[Arrival, int]:
        """Pages present by how they arrived (a copy)."""
        with self._lock:
            created, n = self.created, len(self.created)
            if n > self._tallied:  # only what was created since the last read is counted
                tail = created[self._tallied:n]
                for how in Arrival:
                    self._tally[how] += tail.count(how)
                self._tallied = n
            counts = {how: self._counts[how] + self._tally[how] for how in Arrival}
        if self.makers:
            readahead = sum(m.made_readahead for m in self.makers)
            counts[Arrival.DEMAND] += self._made_elsewhere() - readahead
            counts[Arrival.READAHEAD] += readahead
        return counts

    # -- queries (lock-free: single bytes read under the GIL) ---------------------------------
    def is_present(self, page: int) -> bool:
        return self.state[page] == PRESENT

    def is_zero(self, page: int) -> bool:
        return (self.zero_bitmap[page >> 3] >> (page & 7)) & 1 == 1

    def zero_runs(self) -> Iterator[tuple[int, int]]:
        """(first page, count) of each run of zero-map pages, in order. Whole 0xFF bytes are
        stepped over eight pages at a time by the regex engine: only bytes with some bits set
        are looked at bit by bit, so a mostly-zero 4 GiB guest's map (128 KiB) costs as many
        Python steps as it has runs, not one per byte (this runs beside the resumed vCPUs)."""
        run_start, run_len = -1, 0
        for page, n in self._zero_pieces():
            if run_len and run_start + run_len == page:
                run_len += n
                continue
            if run_len:
                yield run_start, run_len
            run_start, run_len = page, n
        if run_len:
            yield run_start, min(run_len, self.npages - run_start)

    def _zero_pieces(self) -> Iterator[tuple[int, int]]:
        """Set bits of the zero map as (page, count) pieces in order, adjacent ones not merged."""
        bitmap = self.zero_bitmap
        for span in _SET_BYTES.finditer(bitmap):
            pos, end = span.span()
            for partial in _PARTIAL_BYTE.finditer(bitmap, pos, end):
                p = partial.start()
                if p > pos:
                    yield pos * 8, (p - pos) * 8  # whole bytes before it: eight zero pages each
                byte = bitmap[p]
                for bit in range(8):
                    if byte >> bit & 1:
                        yield p * 8 + bit, 1
                pos = p + 1
            if end > pos:
                yield pos * 8, (end - pos) * 8

    def missing_run(self, page: int, limit: int) -> int:
        """How many pages from ``page`` on (at most ``limit``) are MISSING and of the same kind
        (zero or not) as ``page``: the readahead window that is worth asking for. Computed on
        whole byte strings and integers, not page by page (a background batch is 256 pages)."""
        end = min(page + limit, self.npages)
        if end <= page:
            return 0
        span = self.state[page:end]
        n = len(span) - len(span.lstrip(_MISSING))
        if n == 0:
            return 0
        # The zero bits of [page, page + n) as an integer, bit 0 = page: the run of the same
        # kind is its trailing zeros (data pages) or trailing ones (zero pages).
        bits = int.from_bytes(self.zero_bitmap[page >> 3:((page + n) >> 3) + 1], "little") >> (page & 7)
        if bits & 1:
            bits = ~bits
        same = (bits & -bits).bit_length() - 1 if bits else n
        return min(n, same)

    def next_missing(self, start: int) -> int:
        """The first MISSING page at or after ``start``, or -1."""
        return self.state.find(_MISSING, start)

    # -- transitions -------------------------------------------------------------------------
    def claim(self, page: int, limit: int) -> int:
        """Mark up to ``limit`` MISSING pages from ``page`` IN_FLIGHT (stopping at the first one
        that is not MISSING, or that differs in zero-ness); returns how many were claimed."""
        with self._lock:
            n = self.missing_run(page, limit)
            if n:
                self.state[page:page + n] = bytes([IN_FLIGHT]) * n
            return n

    def claim_readahead(self, page: int, window: int) -> int:
        """Claim the readahead behind a demanded ``page``: up to ``window - 1`` MISSING data
        pages right after it, in the same memory region. Returns how many were claimed."""
        if window <= 1:
            return 0
        end = self._region_end(page)
        if page + 1 >= end or self.is_zero(page + 1):
            return 0
        return self.claim(page + 1, min(window - 1, end - page - 1))

    def ahead_run(self, page: int, limit: int) -> int:
        """How many MISSING data pages from ``page`` on (at most ``limit``, in its memory region)
        a scanning vCPU's prefetcher may take ahead of the guest (prefetch.py claims them next,
        with ``claim``, which stops where another thread got there first)."""
        if page >= self.npages or self.is_zero(page):
            return 0
        return self.missing_run(page, min(limit, self._region_end(page) - page))

    def _region_end(self, page: int) -> int:
        """The page after the last of ``page``'s memory region."""
        region = self.memory.region_of(self.memory.page_gpa(page))
        return region.first_page + region.pages

    def release(self, page: int, npages: int) -> None:
        """Give back a claim whose fetch failed: IN_FLIGHT pages become MISSING again."""
        with self._lock:
            for p in range(page, page + npages):
                if self.state[p] == IN_FLIGHT:
                    self.state[p] = MISSING

    def mark_present(self, page: int, npages: int, how: Arrival, created: int | None = None) -> int:
        """Record that [page, page+npages) is installed; returns how many pages it counted.
        ``created``: how many of them the caller's UFFDIO_COPY/ZEROPAGE created, which is what
        is counted; None (pages written before guest RAM was registered, with no install to
        ask) counts those not marked yet."""
        end = page + npages
        with self._lock:
            state, arrival = self.state, self.arrival
            absent = npages - state.count(_PRESENT, page, end)
            if absent == npages:  # the usual batch: none was marked, one slice assignment each
                state[page:end] = _PRESENT * npages
                arrival[page:end] = bytes((how,)) * npages
            elif absent:
                for p in range(page, end):
                    if state[p] != PRESENT:
                        state[p] = PRESENT
                        arrival[p] = how
            new = absent if created is None else created
            if new:
                self._counts[how] += new
                self.counted += new
                if self.present == self.npages:
                    self.all_present.set()
            return new

    def mark_created(self, page: int, how: Arrival) -> None:
        """One page the caller's own UFFDIO_COPY created just now (it did not get EEXIST), as a
        fault installs it: recorded and counted without the lock. No other install created
        it, so nobody else counts it. A claim racing this may mark the page IN_FLIGHT again;
        its install then finds it existing (EEXIST, not counted) and marks it PRESENT.
        exit_mode.ExitModeResolver._run does these same four steps inline."""
        self.state[page] = PRESENT
        self.arrival[page] = how
        created = self.created
        created.append(how)
        # The last page, whoever counts it (where private fault loops make pages too, the
        # sum is short of them and check_complete notices the last)
        if len(created) + self.counted == self.npages:
            self.all_present.set()

    def counts_by_name(self) -> dict[str, int]:
        return {ARRIVAL_NAMES[a]: n for a, n in self.counts.items()}

    def missing(self) -> int:
        return self.npages - self.present
