"""A local page source: the bench's stand-in for the source's page server, with no network.

``SourceImage`` holds what the source would serve: every data page filled, its first qword the
page's gpa (what the `touch` guest checks with TOUCH_CHECK). ``LocalPageConnection`` answers
``fetch(gpa, count, kind)`` as a ``SyncPageConnection`` does, with a batch that points into the
image, so the installer's UFFDIO_COPY reads the image directly: nothing is copied or allocated
per page, and every page is a data page (no zero map).
"""
from __future__ import annotations

import ctypes
import mmap
from array import array

from postcopy.destination.client import FastSource
from vmm.guest import touch
from vmm.guest.layout import DATA_GPA, PAGE_SHIFT, PAGE_SIZE

FILL = 0xA5  # every byte of a data page but its first qword: not a zero page
QWORDS_PER_PAGE = PAGE_SIZE // 8


class SourceImage:
    """``size`` bytes of guest RAM as the source holds it (data pages from DATA_GPA on), page
    aligned as guest RAM is (an anonymous mapping: a bytearray's data starts 16 bytes into a
    page, and every page copied from it would straddle two, which the C limit's never do)."""

    def __init__(self, size: int) -> None:
        self.size = size
        # Private anonymous memory, as the C limit's source (a shared one would be shmem).
        self.buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(self.buffer)), FILL, size)
        first = DATA_GPA // PAGE_SIZE
        qwords = memoryview(self.buffer).cast("Q")
        qwords[first * QWORDS_PER_PAGE::QWORDS_PER_PAGE] = array(
            "Q", map(touch.check_expected, range(DATA_GPA, size, PAGE_SIZE)))
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))


class LocalBatch:
    """A PageBatch-shaped answer (gpa, count, data, runs()) whose data is an address in the
    image; one per connection, refilled by each fetch."""

    __slots__ = ("gpa", "count", "data", "zero", "_view")

    def __init__(self, image: SourceImage) -> None:
        self.gpa = self.count = self.data = 0
        self.zero = bytes((self.count + 7) // 8)  # no zero pages: every page is data
        self._view = memoryview(image.buffer)  # not None: the installer takes the run as data

    def fill(self, gpa: int, count: int, image_address: int) -> LocalBatch:
        self.gpa, self.data = gpa, image_address + gpa
        if count != self.count:
            self.count, self.zero = count, bytes((count + 7) // 8)
        return self

    def runs(self) -> list[tuple[int, int, memoryview | None]]:
        return [(self.gpa, self.count, self._view)]


class LocalPageConnection:
    """Serves pages from a SourceImage; the same interface as SyncPageConnection."""

    def __init__(self, image: SourceImage) -> None:
        self.image = image
        self.batch = LocalBatch(image)
        self.requests = 0
        self._end, self._address = image.size, image.address

    def fetch(self, gpa: int, count: int, kind: str) -> LocalBatch:
        if gpa < DATA_GPA or gpa + (count << PAGE_SHIFT) > self._end:
            raise ValueError(f"local source asked for {count} pages at gpa {gpa:#x}, outside its data pages")
        self.requests += 1
        return self.batch.fill(gpa, count, self._address)

    def fetch_page(self, gpa: int) -> int:
        """One page on demand: its address in the image (as SyncPageConnection.fetch_page
        gives the address of a checked page in its receive buffer)."""
        self.requests += 1
        return self.finish_page(gpa, 0, 0)

    def fast_source(self) -> FastSource:
        """For the private fault loop: the image's address (it reads pages from there itself)."""
        return FastSource(-1, image=self._address, keep=self.image)

    def add_fast_requests(self, n: int) -> None:
        self.requests += n

    def finish_page(self, gpa: int, received: int, error: int) -> int:
        """fetch_page for a page the private fault loop asked for (the image has no socket to
        fail: only an install failure brings it here, to be installed again and explained)."""
        if gpa < DATA_GPA or gpa + PAGE_SIZE > self._end:
            raise ValueError(f"local source asked for the page at gpa {gpa:#x}, outside its data pages")
        return self._address + gpa

    def close(self) -> None:
        pass
