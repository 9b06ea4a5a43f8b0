"""Readahead sized by what recent faults show: a vCPU that faults where its last window ended
is scanning, so its window doubles; any other fault starts again from the base window."""
from __future__ import annotations

DEFAULT_BASE = 4
DEFAULT_MAX = 256


class Readahead:
    __slots__ = ("base", "max", "size", "next_expected")

    def __init__(self, base: int = DEFAULT_BASE, maximum: int = DEFAULT_MAX) -> None:
        self.base = max(1, base)
        self.max = max(self.base, maximum)
        self.size = self.base
        self.next_expected = -1

    def window(self, page: int) -> int:
        """Pages to ask for, starting at the faulting ``page``."""
        self.size = min(self.size * 2, self.max) if page == self.next_expected else self.base
        return self.size

    def fetched(self, page: int, npages: int) -> None:
        self.next_expected = page + npages
