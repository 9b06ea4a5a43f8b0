"""The background transfer's threads (postcopy/destination/background.py): cancelled, it returns
only once every thread has, so that its owner may then unmap RAM and close the uffd."""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from postcopy.destination.background import run_background
from postcopy.destination.install import Installer
from postcopy.destination.pages import PageTracker
from proto import PAGE_SIZE, PageBatch, PageRequest, build_page_batch
from vmm.memory import GuestMemory
from vmm.uffd import Uffd

pytestmark = pytest.mark.usefixtures("uffd_available")
PAGES = 64


class Answers:
    """What transfer() uses of a connection: each request answered in order with its pages."""

    def __init__(self) -> None:
        self.sent: list[PageRequest] = []

    def send(self, gpa: int, count: int, kind: str) -> PageRequest:
        self.sent.append(PageRequest(gpa, count, kind))  # type: ignore[arg-type]
        return self.sent[-1]

    def receive(self, request: PageRequest) -> PageBatch:
        assert self.sent.pop(0) == request
        return PageBatch.decode(build_page_batch(request.gpa, request.count, bytes([7]) * request.count * PAGE_SIZE))


class HeldInstaller(Installer):
    """Its first batch install waits until released: a thread caught in UFFDIO_COPY."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inside, self.release = threading.Event(), threading.Event()

    def install_batch(self, *args: Any, **kwargs: Any) -> None:
        if not self.inside.is_set():
            self.inside.set()
            self.release.wait(10)
        super().install_batch(*args, **kwargs)


def test_a_cancelled_transfer_returns_only_once_its_threads_have() -> None:
    uffd = Uffd(0)
    memory = GuestMemory.create(PAGES * PAGE_SIZE, "anon")
    try:
        uffd.register(memory.regions[0].hva, memory.regions[0].size)
        installer = HeldInstaller(uffd, memory, PageTracker(memory), wake=False)

        async def scenario() -> None:
            task = asyncio.ensure_future(run_background([Answers()], installer, batch_pages=8, depth=2))  # type: ignore[list-item]
            assert await asyncio.to_thread(installer.inside.wait, 10)
            task.cancel()
            await asyncio.sleep(0.2)
            assert not task.done()  # its thread is still in an install
            installer.release.set()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
            assert installer.tracker.present >= 8  # by then its held batch went in, and was counted
        asyncio.run(scenario())
    finally:
        memory.close()
        uffd.close()
