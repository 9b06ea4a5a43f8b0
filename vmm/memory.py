"""Guest RAM: host mappings, memslots, and GPA <-> host virtual address translation.

Never read a page of a userfaultfd-registered region from Python unless it is known to be
present: the access would raise SIGBUS (UFFD_FEATURE_SIGBUS) and kill the process, or block
forever (classic mode) if it happens on the thread that serves faults.
"""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from vmm import libc
from vmm.guest.layout import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from vmm.kvm import Vm

Backing = Literal["anon", "memfd"]
# resident_pages: mincore this many pages at a time inside a data extent (64 MiB).
RESIDENT_CHUNK_PAGES = 1 << 14


class GuestMemoryError(ValueError):
    """Bad guest memory configuration or an access outside guest RAM."""


@dataclass(slots=True)
class MemoryRegion:
    slot: int
    gpa: int
    size: int
    hva: int
    first_page: int  # index of this region's first page in the global page numbering
    fd: int = -1  # the memfd, for memfd-backed regions

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def pages(self) -> int:
        return self.size >> PAGE_SHIFT


def parse_size(text: str) -> int:
    """'256M', '1G', '4096', '64K' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise GuestMemoryError(f"cannot read memory size {text!r}: use a number with K, M or G, e.g. 256M") from None


def _map(size: int, backing: Backing, name: str) -> tuple[int, int]:
    fd = -1
    if backing == "memfd":
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        flags = libc.MAP_SHARED | libc.MAP_NORESERVE
    else:
        flags = libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE
    hva = libc.mmap(None, size, libc.PROT_READ | libc.PROT_WRITE, flags, fd, 0)
    if hva in (None, libc.MAP_FAILED):
        err = ctypes.get_errno()
        if fd >= 0:
            os.close(fd)
        raise GuestMemoryError(f"cannot map {size >> 20} MiB of guest RAM: {os.strerror(err)}")
    return hva, fd


class GuestMemory:
    """Guest RAM as one or more regions, each a host mapping and a KVM memslot."""

    def __init__(self, regions: list[MemoryRegion], backing: Backing) -> None:
        self.regions = regions
        self.backing = backing
        self.size = sum(r.size for r in regions)
        self.pages = self.size >> PAGE_SHIFT

    @classmethod
    def create(cls, size: int, backing: Backing = "anon", name: str = "guest-ram") -> GuestMemory:
        """One region of ``size`` bytes at GPA 0."""
        return cls.create_layout([(0, size)], backing, name)

    @classmethod
    def create_layout(cls, layout: list[tuple[int, int]], backing: Backing = "anon",
                      name: str = "guest-ram") -> GuestMemory:
        """Regions at the given (gpa, size) pairs, in GPA order, none overlapping."""
        regions: list[MemoryRegion] = []
        first_page, prev_end = 0, 0
        for slot, (gpa, size) in enumerate(layout):
            if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
                raise GuestMemoryError(f"guest memory region at {gpa:#x} of {size} bytes: "
                                       f"address and size must be positive multiples of {PAGE_SIZE} (4 KiB)")
            if gpa < prev_end:
                raise GuestMemoryError(f"guest memory region at {gpa:#x} overlaps the one before it")
            hva, fd = _map(size, backing, name)
            regions.append(MemoryRegion(slot, gpa, size, hva, first_page, fd))
            first_page += size >> PAGE_SHIFT
            prev_end = gpa + size
        return cls(regions, backing)

    def register(self, vm: Vm, flags: int = 0) -> None:
        for r in self.regions:
            vm.set_user_memory_region(r.slot, r.gpa, r.size, r.hva, flags)

    def region_of(self, gpa: int, length: int = 1) -> MemoryRegion:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r
        raise GuestMemoryError(f"guest physical range {gpa:#x}+{length:#x} is not inside guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions)

    def hva(self, gpa: int, length: int = 1) -> int:
        r = self.region_of(gpa, length)
        return r.hva + (gpa - r.gpa)

    def gpa_of_hva(self, hva: int) -> int | None:
        for r in self.regions:
            if r.hva <= hva < r.hva + r.size:
                return r.gpa + (hva - r.hva)
        return None

    def page_index(self, gpa: int) -> int:
        """The global page number of ``gpa`` (regions numbered back to back): bitmap index."""
        r = self.region_of(gpa)
        return r.first_page + ((gpa - r.gpa) >> PAGE_SHIFT)

    def page_gpa(self, index: int) -> int:
        for r in self.regions:
            if r.first_page <= index < r.first_page + r.pages:
                return r.gpa + ((index - r.first_page) << PAGE_SHIFT)
        raise GuestMemoryError(f"page index {index} is outside guest RAM ({self.pages} pages)")

    def read(self, gpa: int, length: int) -> bytes:
        return ctypes.string_at(self.hva(gpa, length), length)

    def write(self, gpa: int, data: bytes) -> None:
        ctypes.memmove(self.hva(gpa, len(data)), data, len(data))

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM (no copy); all of it must be present."""
        return memoryview((ctypes.c_char * length).from_address(self.hva(gpa, length))).cast("B")

    def resident_pages(self) -> bytearray:
        """One byte per page, bit 0 set where the host has the page (mincore): a page the host
        never had is zero, so this finds untouched guest RAM without reading it.

        A memfd region's holes are skipped with lseek(SEEK_DATA) (one call per hole, whatever
        its size) and mincore runs only from each data start to the next hole: mincore costs
        per page, and a mostly untouched 4 GiB guest took it 127 ms here, against 0.4 ms."""
        out = bytearray(self.pages)
        for r in self.regions:
            if r.fd < 0:
                self._mincore(out, r, 0, r.pages)
                continue
            page = 0
            while page < r.pages:
                try:
                    page = os.lseek(r.fd, page << PAGE_SHIFT, os.SEEK_DATA) >> PAGE_SHIFT
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data from here to the end
                        break
                    raise GuestMemoryError(f"lseek(SEEK_DATA) on the memfd of slot {r.slot}: {e}") from None
                start = page
                while page < r.pages:  # a data extent: mincore chunk by chunk up to its first hole
                    end = min(page + RESIDENT_CHUNK_PAGES, r.pages)
                    self._mincore(out, r, page, end - page)
                    hole = out.find(0, r.first_page + page, r.first_page + end)
                    if hole >= 0:
                        # mincore has the last word; a page SEEK_DATA calls data but mincore
                        # does not is stepped over, so the outer loop always moves on.
                        page = max(hole - r.first_page, start + 1)
                        break
                    page = end
        return out

    @staticmethod
    def _mincore(out: bytearray, r: MemoryRegion, page: int, npages: int) -> None:
        vec = (ctypes.c_ubyte * npages).from_buffer(out, r.first_page + page)
        libc.check(libc.mincore(r.hva + (page << PAGE_SHIFT), npages << PAGE_SHIFT, vec), "mincore")

    def discard(self, gpa: int, length: int) -> None:
        """Give pages back to the host (MADV_DONTNEED): they read as zero, or fault again."""
        r = self.region_of(gpa, length)
        if r.fd >= 0:  # a memfd's pages outlive MADV_DONTNEED in its page cache: punch them out
            libc.check(libc.fallocate(r.fd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE, gpa - r.gpa, length),
                       "fallocate(PUNCH_HOLE)")
        libc.check(libc.madvise(r.hva + (gpa - r.gpa), length, libc.MADV_DONTNEED), "madvise")

    def close(self) -> None:
        for r in self.regions:
            if r.hva:
                libc.munmap(r.hva, r.size)
                r.hva = 0
            if r.fd >= 0:
                os.close(r.fd)
                r.fd = -1
