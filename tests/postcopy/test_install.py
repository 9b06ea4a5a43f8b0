"""The installer against a real userfaultfd: an install that finds guest RAM unregistered is
harmless once every page is present (the completion race), an error before that."""
from __future__ import annotations

import pytest

from postcopy.destination.install import Installer, buffer_address
from postcopy.destination.pages import Arrival, PageTracker
from proto import PAGE_SIZE, PageBatch, build_page_batch
from vmm import libc
from vmm.memory import GuestMemory
from vmm.uffd import Uffd, UffdError

pytestmark = pytest.mark.usefixtures("uffd_available")
PAGES = 4


def _setup() -> tuple[Uffd, GuestMemory, PageTracker, Installer]:
    uffd = Uffd(0)
    memory = GuestMemory.create(PAGES * PAGE_SIZE, "anon", "install-test")
    region = memory.regions[0]
    uffd.register(region.hva, region.size)
    tracker = PageTracker(memory)
    return uffd, memory, tracker, Installer(uffd, memory, tracker, wake=True)


def _batch(first_page: int, count: int) -> PageBatch:
    data = bytes(range(1, 256)) * ((count * PAGE_SIZE) // 255 + 1)
    return PageBatch.decode(build_page_batch(first_page * PAGE_SIZE, count, data[:count * PAGE_SIZE]))


def test_an_install_racing_the_unregister_at_completion_is_dropped() -> None:
    uffd, memory, tracker, installer = _setup()
    try:
        installer.install_batch(_batch(0, PAGES), Arrival.BACKGROUND)
        assert tracker.all_present.is_set()
        region = memory.regions[0]
        uffd.unregister(region.hva, region.size)
        installer.install_batch(_batch(1, 1), Arrival.DEMAND)  # late: ENOENT, and nothing lost
        installer.install_zero(2, 1)
        assert tracker.counts[Arrival.BACKGROUND] == PAGES and tracker.counts[Arrival.DEMAND] == 0
    finally:
        memory.close()
        uffd.close()


def test_an_install_into_unregistered_ram_before_completion_is_an_error() -> None:
    uffd, memory, tracker, installer = _setup()
    try:
        region = memory.regions[0]
        uffd.unregister(region.hva, region.size)
        with pytest.raises(UffdError, match="ENOENT"):
            installer.install_batch(_batch(0, 1), Arrival.DEMAND)
        assert tracker.missing() == PAGES
    finally:
        memory.close()
        uffd.close()


def test_a_batch_over_a_page_a_fault_created_counts_only_the_pages_it_created() -> None:
    uffd, memory, tracker, installer = _setup()
    try:
        copier = installer.page_copier()
        page = _batch(2, 1)
        installer.install_page(2, memory.regions[0].hva + 2 * PAGE_SIZE, buffer_address(page.data), Arrival.DEMAND, copier)
        assert tracker.counts[Arrival.DEMAND] == 1 and installer.installed_bytes == PAGE_SIZE
        # A demanded page 1 with readahead 2..3: page 2 exists, so the readahead created one.
        installer.install_batch(_batch(1, 3), Arrival.READAHEAD, first_how=Arrival.DEMAND)
        counts = tracker.counts
        assert (counts[Arrival.DEMAND], counts[Arrival.READAHEAD]) == (2, 1)
        # And a background batch over all four creates only page 0.
        installer.install_batch(_batch(0, PAGES), Arrival.BACKGROUND)
        assert tracker.counts[Arrival.BACKGROUND] == 1 and tracker.all_present.is_set()
        assert sum(tracker.counts.values()) == PAGES and installer.installed_bytes == PAGES * PAGE_SIZE
    finally:
        memory.close()
        uffd.close()


class _AddressBatch:
    """A batch of data pages read from an address (as a local page source's), one run."""

    def __init__(self, first_page: int, count: int, address: int) -> None:
        self.gpa, self.count, self.data = first_page * PAGE_SIZE, count, address

    def runs(self) -> list[tuple[int, int, bytes]]:
        return [(self.gpa, self.count, b"data")]


@pytest.mark.parametrize("first_how", [None, Arrival.DEMAND])
def test_a_batch_that_fails_partway_counts_the_pages_it_created_before_the_error(first_how: Arrival | None) -> None:
    """Its last two pages unreadable: the first two go in and are counted before the error goes
    on, so that once another install brings the rest every page is counted (a prefetcher that
    survives the error gives its claim back, and the next install of those two finds them)."""
    uffd, memory, tracker, installer = _setup()
    src = libc.mmap(None, PAGES * PAGE_SIZE, libc.PROT_READ | libc.PROT_WRITE,
                    libc.MAP_PRIVATE | libc.MAP_ANONYMOUS, -1, 0)
    try:
        libc.munmap(src + 2 * PAGE_SIZE, 2 * PAGE_SIZE)
        with pytest.raises(UffdError, match="EFAULT"):
            installer.install_batch(_AddressBatch(0, PAGES, src), Arrival.READAHEAD, first_how=first_how)  # type: ignore[arg-type]
        assert [tracker.is_present(p) for p in range(PAGES)] == [True, True, False, False]
        counts = tracker.counts
        if first_how is None:
            assert counts[Arrival.READAHEAD] == 2
        else:
            assert (counts[Arrival.DEMAND], counts[Arrival.READAHEAD]) == (1, 1)
        assert installer.installed_bytes == 2 * PAGE_SIZE
        installer.install_batch(_batch(0, PAGES), Arrival.BACKGROUND)  # the rest, and two found there
        assert tracker.counts[Arrival.BACKGROUND] == 2 and tracker.all_present.is_set()
    finally:
        libc.munmap(src, 2 * PAGE_SIZE)
        memory.close()
        uffd.close()
