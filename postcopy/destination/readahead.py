"""Readahead sized by what recent faults show: a vCPU that faults where its last window ended
is scanning, so its window doubles; any other fault starts again from the base window. A
scanning vCPU hands the windows after this one to its prefetcher (prefetch.py), which fetches
and installs them while the guest works through the current one."""
from __future__ import annotations

DEFAULT_BASE = 4
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
