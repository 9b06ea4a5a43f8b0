"""A real page server on a thread and event loop of its own, serving a memtouch source VM, and
a real Destination in the same process: for tests that look inside a migration."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from postcopy.destination.migration import Destination
from postcopy.source.page_server import PageServer
from postcopy.source.run import boot_memtouch
from vmm.machine import Machine

MiB = 1 << 20
GUEST = 32 * MiB
TOKEN = "in-process-token"


class SourceThread:
    """The page server on a thread and event loop of its own, as in its own process: the
    destination's loop blocks (pausing its vCPUs) while a vCPU may wait on a page."""

    def __init__(self, machine: Machine, workload: dict[str, int | str]) -> None:
        self.machine, self.workload = machine, workload
        self.ready = threading.Event()
        self.url = ""
        self.server: PageServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="source", daemon=True)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with PageServer(self.machine, token=TOKEN, migration_id="mig-in-process", workload=self.workload) as server:
            self.server, self.url = server, await server.start("127.0.0.1", 0)
            self.ready.set()
            await self._stop.wait()

    def __enter__(self) -> SourceThread:
        self._thread.start()
        assert self.ready.wait(10), "the page server did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


async def past_memtouch_fill(server: PageServer, timeout: float = 30) -> None:
    """Wait until every vCPU of the source's memtouch has reported once: past its fill, which
    writes every page in order, so that the faults after a switchover are its random writes
    (demand faults) and not scans, which the readahead's prefetchers would take."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not all(p.reports for p in server.machine.services.progress):
        assert loop.time() < deadline, "the source's guest never reported"
        await asyncio.sleep(0.02)


def migrate_in_process(check: Callable[[PageServer, Destination], Awaitable[None]], **options: Any) -> None:
    """Boot the source, serve it, prepare a Destination (``options``: its keyword arguments) and
    hand both to ``check``; the destination is closed after it."""
    machine, workload = boot_memtouch(GUEST, 2, seed=5)
    try:
        with SourceThread(machine, workload) as source:
            async def migrate() -> None:
                dest = Destination(source.url, TOKEN, **{"fault_mode": "exit", **options})
                try:
                    await dest.prepare(GUEST, len(machine.vcpus))
                    assert source.server is not None
                    await check(source.server, dest)
                finally:
                    await dest.close()
            asyncio.run(migrate())
    finally:
        machine.close()
