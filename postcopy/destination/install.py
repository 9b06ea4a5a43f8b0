"""Installing fetched pages into userfaultfd-registered guest RAM and recording them.

A batch is installed run by run: one UFFDIO_COPY per run of data pages, one UFFDIO_ZEROPAGE per
run of zero pages. EEXIST (another thread got there first) is normal and skipped by Uffd.
"""
from __future__ import annotations

import ctypes
import errno

from proto import PAGE_SIZE, PageBatch
from postcopy.destination.pages import Arrival, PageTracker
from vmm.abi.userfaultfd import UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_ZEROPAGE_MODE_DONTWAKE
from vmm.memory import GuestMemory
from vmm.uffd import Uffd, UffdError


def buffer_address(data: bytes) -> int:
    """Address of a bytes object's buffer, without a copy (valid while ``data`` lives)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


class Installer:
    """Installs pages for one fault mode: DONTWAKE where vCPUs resolve their own exits (nobody
    sleeps on the uffd wait queue), waking where they sleep in the kernel (classic)."""

    def __init__(self, uffd: Uffd, memory: GuestMemory, tracker: PageTracker, *, wake: bool) -> None:
        self.uffd = uffd
        self.memory = memory
        self.tracker = tracker
        self.copy_mode = 0 if wake else UFFDIO_COPY_MODE_DONTWAKE
        self.zero_mode = 0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE
        self.installed_bytes = 0

    def install_batch(self, batch: PageBatch, how: Arrival, first_how: Arrival | None = None) -> None:
        """Install every page of a verified batch; the first page is recorded as ``first_how``
        (the demanded page) and the rest as ``how`` (its readahead)."""
        base = buffer_address(batch.data)
        offset = 0
        try:
            for gpa, npages, view in batch.runs():
                length = npages * PAGE_SIZE
                hva = self.memory.hva(gpa, length)
                if view is None:
                    self.uffd.zeropage(hva, length, self.zero_mode)
                else:
                    self.installed_bytes += self.uffd.copy(hva, base + offset, length, self.copy_mode)
                    offset += length
        except UffdError as error:
            self._raise_unless_complete(error)
            return
        page = self.memory.page_index(batch.gpa)
        if first_how is not None:
            self.tracker.mark_present(page, 1, first_how)
            self.tracker.mark_present(page + 1, batch.count - 1, how)
        else:
            self.tracker.mark_present(page, batch.count, how)

    def install_zero(self, page: int, npages: int) -> None:
        """Pages the source's zero map says are all zeros: installed here, never fetched."""
        gpa = self.memory.page_gpa(page)
        length = npages * PAGE_SIZE
        try:
            self.uffd.zeropage(self.memory.hva(gpa, length), length, self.zero_mode)
        except UffdError as error:
            self._raise_unless_complete(error)
            return
        self.tracker.mark_present(page, npages, Arrival.ZERO)

    def _raise_unless_complete(self, error: UffdError) -> None:
        # Once every page is present the destination unregisters guest RAM and UFFDIO_* fail
        # with ENOENT: a fetch still under way then (a vCPU retrying, say) brought nothing new.
        if error.errno != errno.ENOENT or not self.tracker.all_present.is_set():
            raise error

    def install_run(self, gpa: int, data: bytes, how: Arrival) -> None:
        """A run of pages sent whole (the eager set)."""
        self.installed_bytes += self.uffd.copy(self.memory.hva(gpa, len(data)), buffer_address(data), len(data), self.copy_mode)
        self.tracker.mark_present(self.memory.page_index(gpa), len(data) // PAGE_SIZE, how)
