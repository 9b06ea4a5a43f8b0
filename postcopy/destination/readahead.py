"""Readahead sized by what recent faults show: a vCPU that faults where its last window ended
is scanning, so its window doubles; any other fault starts again from the base window. A
scanning vCPU hands the windows after this one to its prefetcher (prefetch.py), which fetches
and installs them while the guest works through the current one."""
from __future__ import annotations

# One page: a fault that starts no scan brings its page alone (a scan doubles from there). A first
# window of 4 took 80-120 us a fault against 30-42 us for one page in a 2-vCPU demo whose guest
# writes scattered pages, and a 24 MiB scan paged in at the same rate either way (284 k against
# 286 k pages/s, twelve rounds): docs/performance.md, A GIL per vCPU thread.
DEFAULT_BASE = 1
DEFAULT_MAX = 256


class Readahead:
    __slots__ = ("base", "max", "size", "next_expected", "scanning")

    def __init__(self, base: int = DEFAULT_BASE, maximum: int = DEFAULT_MAX) -> None:
        self.base = max(1, base)
        self.max = max(self.base, maximum)
        self.size = self.base
        self.next_expected = -1
        self.scanning = False  # the last fault was where the previous window ended

    def window(self, page: int) -> int:
        """Pages to ask for, starting at the faulting ``page``."""
        self.scanning = page == self.next_expected
        self.size = min(self.size * 2, self.max) if self.scanning else self.base
        return self.size

    def fetched(self, page: int, npages: int) -> None:
        self.next_expected = page + npages
