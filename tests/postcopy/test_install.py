"""The installer against a real userfaultfd: an install that finds guest RAM unregistered is
harmless once every page is present (the completion race), an error before that."""
from __future__ import annotations

import pytest

from postcopy.destination.install import Installer
from postcopy.destination.pages import Arrival, PageTracker
from proto import PAGE_SIZE, PageBatch, build_page_batch
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
