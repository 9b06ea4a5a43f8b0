"""Where the background transfer receives pages: a receive area of 2 MiB-aligned transparent
huge pages, from which verified pages are moved into guest RAM with UFFDIO_MOVE, not copied.

Why: on this host allocating guest RAM 4 KiB at a time (what UFFDIO_COPY does for each page it
installs) costs more than moving the bytes (docs/performance.md). A sink's pages are faulted
in as one huge page per 2 MiB when the socket writes into them; a 2 MiB run of a batch aligned
in both the sink and guest RAM then moves whole (one PMD), anything else 4 KiB pages at a time.
After each batch the sink is emptied (MADV_DONTNEED), so that the next batch lands in new huge
pages instead of in the 4 KiB pages left where a huge page was split.
"""
from __future__ import annotations

import ctypes
import os
from typing import Final

from vmm import libc
from vmm.abi.userfaultfd import UFFD_FEATURE_MOVE
from vmm.memory import GuestMemory
from vmm.uffd import Uffd

HUGE_PAGE: Final = 2 << 20
MADV_HUGEPAGE: Final = 14


def move_feature() -> int:
    """UFFD_FEATURE_MOVE if this kernel offers it (ask for it when opening the uffd), else 0."""
    return Uffd.available_features() & UFFD_FEATURE_MOVE


def prefer_huge_pages(memory: GuestMemory) -> None:
    """Mark guest RAM for transparent huge pages (MADV_HUGEPAGE), before it is registered.

    Then a missing-page fault is reported at the PMD level without allocating a page table (the
    kernel's huge-page fault path asks userfaultfd first), so a 2 MiB range that only faulted
    stays empty and a huge page can still move into it whole; and KVM can map such a page
    with one 2 MiB entry. Pages installed 4 KiB at a time stay 4 KiB pages."""
    for region in memory.regions:
        libc.madvise(region.hva, region.size, MADV_HUGEPAGE)


class SinkError(Exception):
    """The receive area could not be mapped."""


class PageSink:
    """``nbytes`` of receive area (rounded up to huge pages) at a huge-page-aligned address."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        self._mapped = self.nbytes + HUGE_PAGE  # room to align the start
        base = libc.mmap(None, self._mapped, libc.PROT_READ | libc.PROT_WRITE,
                         libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE, -1, 0)
        if base in (None, libc.MAP_FAILED):
            raise SinkError(f"cannot map a {self.nbytes >> 20} MiB page sink: {os.strerror(ctypes.get_errno())}")
        self._base = base
        self.address = (base + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        # Without huge pages (THP off) it still works: 4 KiB pages, moved one by one.
        libc.madvise(self.address, self.nbytes, MADV_HUGEPAGE)
        self.view = memoryview((ctypes.c_char * self.nbytes).from_address(self.address)).cast("B")

    def empty(self) -> None:
        """Drop whatever pages are left (those not moved): the next write faults in huge pages."""
        libc.madvise(self.address, self.nbytes, libc.MADV_DONTNEED)

    def close(self) -> None:
        if self._base:
            self.view.release()
            libc.munmap(self._base, self._mapped)
            self._base = 0
