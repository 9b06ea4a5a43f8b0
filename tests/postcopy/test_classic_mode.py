"""The classic handler's serving of uffd messages, driven without a vCPU: a message as the
kernel writes it in the handler's buffer, served with the handler's own code, against a real
userfaultfd. Guest RAM in one region takes the arithmetic path, in several the regions' lookup."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from postcopy.bench.source import LocalPageConnection, SourceImage
from postcopy.destination.classic_mode import ADDRESS_QWORD, EVENT_QWORD, PTID_QWORD, ClassicHandler
from postcopy.destination.install import Installer
from postcopy.destination.pages import PRESENT, Arrival, PageTracker
from vmm.abi.userfaultfd import UFFD_EVENT_PAGEFAULT
from vmm.guest import touch
from vmm.guest.layout import DATA_GPA, PAGE_SIZE
from vmm.memory import GuestMemory
from vmm.uffd import Uffd

pytestmark = pytest.mark.usefixtures("uffd_available")
MiB = 1 << 20


LAYOUTS = pytest.mark.parametrize("layout", [[(0, 8 * MiB)], [(0, 4 * MiB), (6 * MiB, 2 * MiB)]],
                                  ids=["one-region", "two-regions"])


@contextlib.contextmanager
def one_page_handler(layout: list[tuple[int, int]]) -> Iterator[tuple[ClassicHandler, GuestMemory, PageTracker]]:
    """A classic handler (one page a fault) over registered guest RAM of ``layout`` and a local
    source; its thread is not started: the tests hand it messages themselves."""
    image = SourceImage(8 * MiB)
    memory = GuestMemory.create_layout(layout, "anon", "classic-test")
    uffd = Uffd(0)
    handler: ClassicHandler | None = None
    try:
        for region in memory.regions:
            uffd.register(region.hva, region.size)
        tracker = PageTracker(memory)
        handler = ClassicHandler(uffd, Installer(uffd, memory, tracker, wake=True), [LocalPageConnection(image)],
                                 cpus=[None], readahead_base=1, readahead_max=1)
        yield handler, memory, tracker
    finally:
        if handler is not None:
            handler.close()
        memory.close()
        uffd.close()


@LAYOUTS
def test_a_fault_message_installs_its_page_from_the_source_and_logs_it(layout: list[tuple[int, int]]) -> None:
    with one_page_handler(layout) as (handler, memory, tracker):
        h = handler.handlers[0]
        for gpa in (DATA_GPA, sum(layout[-1]) - PAGE_SIZE):  # in the first region, and the last page of the last
            h.qwords[EVENT_QWORD], h.qwords[PTID_QWORD] = UFFD_EVENT_PAGEFAULT, 4242
            h.qwords[ADDRESS_QWORD] = memory.hva(gpa, 8) + 24  # the faulting address, inside the page
            handler._serve(h, time.monotonic_ns())
            page = memory.page_index(gpa)
            assert tracker.state[page] == PRESENT and tracker.arrival[page] == Arrival.DEMAND
            assert memory.view(gpa, 8).cast("Q")[0] == touch.check_expected(gpa)
        assert tracker.present == 2 and h.faults == 2 and sum(len(log) for log in handler.fault_logs().values()) == 2


@LAYOUTS
def test_a_fault_on_a_page_present_by_then_wakes_its_thread_and_fetches_nothing(layout: list[tuple[int, int]],
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Two vCPUs faulting on one page, each message read by itself: the second finds the page
    # installed for the first, so its thread is only woken.
    with one_page_handler(layout) as (handler, memory, tracker):
        h = handler.handlers[0]
        woken: list[tuple[int, int]] = []
        monkeypatch.setattr(handler.uffd, "wake", lambda hva, length: woken.append((hva, length)))
        gpa = sum(layout[-1]) - PAGE_SIZE
        for i in range(2):
            h.qwords[EVENT_QWORD], h.qwords[PTID_QWORD] = UFFD_EVENT_PAGEFAULT, 4242 + i
            h.qwords[ADDRESS_QWORD] = memory.hva(gpa, 8) + 8 * i
            handler._serve(h, time.monotonic_ns())
        page = memory.page_index(gpa)
        assert tracker.state[page] == PRESENT and tracker.arrival[page] == Arrival.DEMAND
        assert memory.view(gpa, 8).cast("Q")[0] == touch.check_expected(gpa)
        assert tracker.present == 1 == tracker.counts[Arrival.DEMAND] == h.copier.copied and h.faults == 2
        assert woken == [(memory.hva(gpa, PAGE_SIZE), PAGE_SIZE)]
        assert sum(len(log) for log in handler.fault_logs().values()) == 2
