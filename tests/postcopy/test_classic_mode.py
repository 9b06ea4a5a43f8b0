"""The classic handler's serving of uffd messages, driven without a vCPU: a message as the
kernel writes it in the handler's buffer, served with the handler's own code, against a real
userfaultfd. Guest RAM in one region takes the arithmetic path, in several the regions' lookup."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from postcopy.bench.source import LocalPageConnection, SourceImage
from postcopy.destination.classic_mode import ADDRESS_QWORD, EVENT_QWORD, MSG_QWORDS, PTID_QWORD, ClassicHandler
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
            handler._serve(h, 1, time.monotonic_ns())
            page = memory.page_index(gpa)
            assert tracker.state[page] == PRESENT and tracker.arrival[page] == Arrival.DEMAND
            assert memory.view(gpa, 8).cast("Q")[0] == touch.check_expected(gpa)
        assert tracker.present == 2 and h.faults == 2 and sum(len(log) for log in handler.fault_logs().values()) == 2


@LAYOUTS
def test_a_read_of_two_fault_messages_installs_both_pages(layout: list[tuple[int, int]]) -> None:
    # Two vCPUs faulting at once: one read, two messages, pages apart (each one a fault's
    # own install) and a duplicate of the first (present by then: only woken).
    with one_page_handler(layout) as (handler, memory, tracker):
        h = handler.handlers[0]
        gpas = (sum(layout[-1]) - PAGE_SIZE, DATA_GPA, sum(layout[-1]) - PAGE_SIZE)
        for i, gpa in enumerate(gpas):
            q = i * MSG_QWORDS
            h.qwords[q + EVENT_QWORD], h.qwords[q + PTID_QWORD] = UFFD_EVENT_PAGEFAULT, 4242
            h.qwords[q + ADDRESS_QWORD] = memory.hva(gpa, 8) + 8 * i
        handler._serve(h, len(gpas), time.monotonic_ns())
        for gpa in gpas[:2]:
            page = memory.page_index(gpa)
            assert tracker.state[page] == PRESENT and tracker.arrival[page] == Arrival.DEMAND
            assert memory.view(gpa, 8).cast("Q")[0] == touch.check_expected(gpa)
        assert tracker.present == 2 == tracker.counts[Arrival.DEMAND] == h.copier.copied and h.faults == 3
        assert sum(len(log) for log in handler.fault_logs().values()) == 3
