"""The zero map follows the resume (docs/protocol.md, Flow): a real page server and a real
Destination in one process. The guest runs before the destination knows which pages are zero;
then the map comes, fits the header, and the tracker ends with it; a map that does not fit
the header fails the migration with the guest paused, never installing a data page as zeros."""
from __future__ import annotations

import pytest

import postcopy.source.page_server as page_server
from postcopy.destination.migration import Destination, DestinationState, MigrationError
from postcopy.destination.pages import Arrival
from postcopy.source.export import zero_map
from postcopy.source.page_server import PageServer
from proto import PAGE_SIZE, MigrationHeader, ZeroMap
from source_thread import GUEST, migrate_in_process as _run  # type: ignore[import-not-found]
from vmm.memory import GuestMemory

pytestmark = pytest.mark.usefixtures("kvm_available", "uffd_available")


def test_the_guest_runs_before_the_zero_map_which_then_fits_the_header() -> None:
    async def check(server: PageServer, dest: Destination) -> None:
        assert dest.tracker is not None
        await dest.switchover()
        # Resumed with no zero map yet: nothing is taken for zero, so nothing can be wrong.
        assert not any(dest.tracker.zero_bitmap) and dest.tracker.counts[Arrival.ZERO] == 0
        assert dest.state is DestinationState.RUNNING
        result = await dest.wait_complete(timeout=60)
        # The map the tracker ended with is the one served, and marks only pages that are all
        # zeros in the paused source's RAM (built after the resume: pages the page server read
        # before then became data on the memfd, which can only unmark them).
        bitmap = dest.tracker.zero_bitmap
        zero_pages = int.from_bytes(bitmap, "little").bit_count()
        assert server.stats()["zero_map_pages"] == zero_pages > 0
        memory = server.memory
        for page in range(memory.pages):
            if bitmap[page >> 3] >> (page & 7) & 1:
                assert memory.read(page * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE), page
        # Zero pages came from the map, or (asked for before it came) as zero bits of a batch.
        assert result.pages["zero"] <= zero_pages
        assert sum(result.pages.values()) == GUEST // PAGE_SIZE and dest.tracker.missing() == 0
        assert not dest.machine.failures()  # type: ignore[union-attr]

    _run(check)


def test_a_zero_map_that_marks_an_eager_page_fails_the_migration_and_pauses_the_guest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def marks_eager(memory: GuestMemory, header: MigrationHeader) -> ZeroMap:
        bitmap = bytearray(zero_map(memory, header).zero_bitmap)
        page = header.page_index(header.eager[0].gpa)
        bitmap[page >> 3] |= 1 << (page & 7)
        return ZeroMap(header.migration_id, bytes(bitmap))

    monkeypatch.setattr(page_server, "zero_map", marks_eager)

    async def check(server: PageServer, dest: Destination) -> None:
        await dest.switchover()
        with pytest.raises(MigrationError, match="bad zero map from the source: .*of eager\\[0\\] zero"):
            await dest.wait_complete(timeout=60)
        assert dest.state is DestinationState.FAILED
        assert all(t.state.value in ("paused", "halted", "failed") for t in dest.machine.vcpus)  # type: ignore[union-attr]
        assert dest.tracker is not None and not any(dest.tracker.zero_bitmap)

    _run(check)

