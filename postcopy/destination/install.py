"""Installing fetched pages into userfaultfd-registered guest RAM and recording them.

A batch is installed run by run: one UFFDIO_COPY per run of data pages, one UFFDIO_ZEROPAGE per
run of zero pages. EEXIST (another thread got there first) is normal and skipped by Uffd. So is
ENOENT once every page is present: the destination keeps guest RAM registered until it closes
(so a vCPU finishing a fault whose page the background installed meanwhile meets EEXIST), and an
install still in flight when it unregisters finds the range gone; what it carried is there
already.
"""
from __future__ import annotations

import ctypes
import errno
import threading

from proto import PAGE_SIZE, PageBatch
from postcopy.destination.pages import Arrival, PageTracker
from vmm.abi.userfaultfd import UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_ZEROPAGE_MODE_DONTWAKE
from vmm.memory import GuestMemory
from vmm.uffd import PageCopier, Uffd, UffdError


# Where CPython keeps a bytes object's characters: after its header (ob_sval), so the address
# of its data is id() + this, with no ctypes call (a third of a one-page install's Python).
BYTES_DATA_OFFSET = bytes.__basicsize__ - 1


def buffer_address(data: bytes | memoryview | int) -> int:
    """Address of a batch's page data without a copy: a bytes object's buffer (valid while
    ``data`` lives), a view of a writable buffer (a connection's receive buffer, client.py), or
    an address already (a local page source serves from its own buffer)."""
    if type(data) is bytes:
        return id(data) + BYTES_DATA_OFFSET
    if type(data) is int:
        return data
    return ctypes.addressof(ctypes.c_char.from_buffer(data)) if data.nbytes else 0


class Installer:
    """Installs pages for one fault mode: DONTWAKE where vCPUs resolve their own exits (nobody
    sleeps on the uffd wait queue), waking where they sleep in the kernel (classic)."""

    def __init__(self, uffd: Uffd, memory: GuestMemory, tracker: PageTracker, *, wake: bool) -> None:
        self.uffd = uffd
        self.memory = memory
        self.tracker = tracker
        self.copy_mode = 0 if wake else UFFDIO_COPY_MODE_DONTWAKE
        self.zero_mode = 0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE
        # Bytes copied by batch and run installs (several threads: a lock, once per batch);
        # each thread's PageCopier counts its own pages.
        self._copied_bytes = 0
        self._copied_lock = threading.Lock()
        self._copiers: list[PageCopier] = []

    @property
    def installed_bytes(self) -> int:
        """Bytes installed with UFFDIO_COPY (zero pages are not counted)."""
        return self._copied_bytes + PAGE_SIZE * sum(c.copied for c in self._copiers)

    def install_batch(self, batch: PageBatch, how: Arrival, first_how: Arrival | None = None) -> None:
        """Install every page of a verified batch; its first page is recorded as ``first_how``
        where given (the faulting page) and the rest as ``how`` (its readahead)."""
        base = buffer_address(batch.data)
        offset = 0
        created = 0
        existed: list[int] = []  # offsets in the batch of pages another install created first
        try:
            for gpa, npages, view in batch.runs():
                length = npages * PAGE_SIZE
                hva = self.memory.hva(gpa, length)
                before = len(existed)
                if view is None:
                    created += self.uffd.zeropage(hva, length, self.zero_mode, existed)
                else:
                    copied = self.uffd.copy(hva, base + offset, length, self.copy_mode, existed)
                    self._count_copied(copied)
                    created += copied
                    offset += length
                if len(existed) > before:  # offsets in this run, made offsets in the batch
                    existed[before:] = [gpa - batch.gpa + e for e in existed[before:]]
        except UffdError as e:
            if self._gone_after_completion(e):
                return
            # The pages before the failure are in: counted here, by the install that created
            # them (pages.py), before the error goes on. A caller that survives it (the
            # prefetcher) gives its claim back, and a later install finds them existing.
            if view is not None:
                self._count_copied(e.installed)
            existed[before:] = [gpa - batch.gpa + x for x in existed[before:]]
            self._record(batch, (gpa - batch.gpa + e.reached) // PAGE_SIZE, how, first_how,
                         (created + e.installed) // PAGE_SIZE, existed)
            raise
        self._record(batch, batch.count, how, first_how, created // PAGE_SIZE, existed)

    def _record(self, batch: PageBatch, count: int, how: Arrival, first_how: Arrival | None, created: int,
                existed: list[int]) -> None:
        """Mark the batch's first ``count`` pages present; ``created`` of them were created by
        this install, the others (``existed``: byte offsets in the batch) by another."""
        if not count:
            return
        page = self.memory.page_index(batch.gpa)
        if first_how is None:
            self.tracker.mark_present(page, count, how, created)
            return
        ours = 0 if existed[:1] == [0] else 1  # the faulting page, unless another install made it first
        self.tracker.mark_present(page, 1, first_how, ours)
        if count > 1:
            self.tracker.mark_present(page + 1, count - 1, how, created - ours)

    def _count_copied(self, nbytes: int) -> None:
        with self._copied_lock:
            self._copied_bytes += nbytes

    def page_copier(self) -> PageCopier:
        """A one-page UFFDIO_COPY in this installer's mode, for one thread's install_page."""
        copier = self.uffd.page_copier(self.copy_mode)
        self._copiers.append(copier)
        return copier

    def install_page(self, page: int, hva: int, data: int | PageBatch, how: Arrival, copier: PageCopier) -> None:
        """What fetch_page gave for a fault at ``page`` (host address ``hva``, which the caller
        derived from the gpa it fetched), with the calling thread's ``copier``: the address of
        one checked data page, installed with one UFFDIO_COPY and no lookups; or a batch."""
        if type(data) is not int:  # not one data page in the fixed layout (a zero page, say)
            self.install_batch(data, how)  # type: ignore[arg-type]
            return
        try:
            created = copier.copy(hva, data)
        except UffdError as e:
            if self._gone_after_completion(e):
                return
            raise
        if created:  # else another install created it and counts it
            self.tracker.mark_created(page, how)

    def install_zero(self, page: int, npages: int) -> None:
        """Pages the source's zero map says are all zeros: installed here, never fetched."""
        gpa = self.memory.page_gpa(page)
        length = npages * PAGE_SIZE
        try:
            created = self.uffd.zeropage(self.memory.hva(gpa, length), length, self.zero_mode)
        except UffdError as e:
            if self._gone_after_completion(e):
                return
            if e.reached:  # as install_batch: what went in is counted before the error goes on
                self.tracker.mark_present(page, e.reached // PAGE_SIZE, Arrival.ZERO, e.installed // PAGE_SIZE)
            raise
        self.tracker.mark_present(page, npages, Arrival.ZERO, created // PAGE_SIZE)

    def _gone_after_completion(self, e: UffdError) -> bool:
        """ENOENT with every page present: guest RAM was unregistered (Destination.close) under an
        install in flight (try/except, not a context manager: this is the fault path)."""
        return e.errno == errno.ENOENT and self.tracker.all_present.is_set()

    def install_run(self, gpa: int, data: bytes, how: Arrival) -> None:
        """A run of pages sent whole (the eager set)."""
        created = self.uffd.copy(self.memory.hva(gpa, len(data)), buffer_address(data), len(data), self.copy_mode)
        self._count_copied(created)
        self.tracker.mark_present(self.memory.page_index(gpa), len(data) // PAGE_SIZE, how, created // PAGE_SIZE)
