"""The background transfer's zero-copy path: batches received straight into a page sink (huge
pages) and moved into registered guest RAM with UFFDIO_MOVE. Against a real page server on
loopback (whole transfers), and against a fake one that answers wrongly (every wrong answer
refused before anything is installed)."""
from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web

from postcopy.destination.background import transfer
from postcopy.destination.client import FetchError, SyncPageConnection
from postcopy.destination.exit_mode import ExitModeResolver, VcpuFaultState
from postcopy.destination.install import Installer
from postcopy.destination.pages import Arrival, PageTracker
from postcopy.destination.readahead import Readahead
from postcopy.destination.sink import HUGE_PAGE, PageSink, move_feature, prefer_huge_pages
from postcopy.source.page_server import PageServer
from proto import PAGE_SIZE, ErrorReply, PageBatch, PageRequest, build_page_batch, page_batch_parts
from served_memory import SERVED_TOKEN, Served  # type: ignore[import-not-found]
from postcopy.faults import FaultDecoder
from vmm.abi.userfaultfd import UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_MOVE, UFFD_FEATURE_SIGBUS
from vmm.memory import GuestMemory
from vmm.uffd import Uffd

pytestmark = pytest.mark.usefixtures("uffd_available")


class CountingUffd(Uffd):
    """A Uffd that counts the bytes its UFFDIO_MOVE and UFFDIO_COPY installed."""

    moved = copied = 0

    def move(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        n = super().move(dst, src, length, mode)
        self.moved += n
        return n

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        n = super().copy(dst, src, length, mode)
        self.copied += n
        return n


def _pull(url: str, served: Served, present: list[tuple[int, int]], batch_pages: int) -> tuple[CountingUffd, bytes]:
    """Every page of ``served`` through ``transfer`` into fresh registered RAM, after installing
    ``present`` (page, count) runs first as a vCPU would; returns the uffd and RAM's contents."""
    memory = GuestMemory.create(served.memory.size, "anon", "sink-test")
    prefer_huge_pages(memory)
    uffd = CountingUffd(UFFD_FEATURE_MISSING_SHMEM | move_feature())
    try:
        uffd.register(memory.regions[0].hva, memory.size)
        tracker = PageTracker(memory, served.header.zero_bitmap)
        installer = Installer(uffd, memory, tracker, wake=False)
        for page, count in present:
            data = served.memory.read(page * PAGE_SIZE, count * PAGE_SIZE)
            installer.install_run(page * PAGE_SIZE, data, Arrival.DEMAND)
        connection = SyncPageConnection(url, SERVED_TOKEN)
        try:
            transfer(connection, installer, threading.Event(), batch_pages=batch_pages)
        finally:
            connection.close()
        assert tracker.all_present.is_set()
        contents = memory.read(0, memory.size)
        uffd.unregister(memory.regions[0].hva, memory.size)
        return uffd, contents
    finally:
        uffd.close()
        memory.close()


@pytest.mark.parametrize(("present", "batch_pages"), [
    ([], HUGE_PAGE // PAGE_SIZE),  # aligned huge pages (every 8th page zero: split into runs)
    ([(3, 1), (600, 40)], HUGE_PAGE // PAGE_SIZE),  # pages already there: batches around them
    ([], 100),  # batches that are no huge page: 4 KiB moves
])
def test_background_moves_every_page_in_and_ram_holds_the_sources_contents(
        served: Served, present: list[tuple[int, int]], batch_pages: int) -> None:
    if not Uffd.available_features() & UFFD_FEATURE_MOVE:
        pytest.skip("this kernel has no UFFDIO_MOVE (Linux < 6.8): the background copies")
    header = served.header

    async def main() -> tuple[CountingUffd, bytes]:
        async with PageServer.resumed(served.memory, header, header.encode(), token=SERVED_TOKEN) as server:
            url = await server.start("127.0.0.1", 0)
            return await asyncio.to_thread(_pull, url, served, present, batch_pages)

    uffd, contents = asyncio.run(main())
    assert contents == served.memory.read(0, served.memory.size)
    assert uffd.moved > 0 and uffd.copied == sum(n for _, n in present) * PAGE_SIZE  # only the runs put first


def test_a_sink_is_huge_page_aligned_and_writable() -> None:
    sink = PageSink(3 * PAGE_SIZE)
    try:
        assert sink.nbytes == HUGE_PAGE and sink.address % HUGE_PAGE == 0
        sink.view[:5] = b"pages"
        sink.empty()
        assert bytes(sink.view[:5]) == bytes(5)  # emptied: the next write faults in new pages
    finally:
        sink.close()


# -- wrong answers, received into a sink -----------------------------------------------------

PAGES = os.urandom(4 * PAGE_SIZE)


def _good(request: PageRequest) -> bytes:
    return b"".join(page_batch_parts(request.gpa, request.count, PAGES[:request.count * PAGE_SIZE]))


def _corrupted(request: PageRequest) -> bytes:
    batch = bytearray(_good(request))
    batch[-100] ^= 0xFF  # inside the page data, which goes to the sink
    return bytes(batch)


def _data_too_long(request: PageRequest) -> bytes:
    """A data entry whose bin length says more than the message holds."""
    parts = page_batch_parts(request.gpa, request.count, PAGES[:request.count * PAGE_SIZE])
    head = bytearray(parts[0])
    head[-4:] = (len(parts[1]) + PAGE_SIZE).to_bytes(4, "big")
    return bytes(head) + bytes(parts[1])


def _fake_server(answer: Callable[[PageRequest], bytes], client: Callable[[str], None], *, ping: bool = False) -> None:
    """An aiohttp WebSocket server answering each request with ``answer(request)`` (after a
    ping if ``ping``); ``client(url)`` runs on a thread."""
    async def main() -> None:
        async def handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    continue
                if ping:
                    await ws.ping(b"are you there")
                await ws.send_bytes(answer(PageRequest.decode(msg.data)))
            return ws

        app = web.Application()
        app.add_routes([web.get("/v1/pages/ws", handler)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            await asyncio.to_thread(client, f"http://127.0.0.1:{runner.addresses[0][1]}")
        finally:
            await runner.cleanup()

    asyncio.run(main())


@pytest.mark.parametrize(("answer", "why"), [
    (_corrupted, "checksum"),
    (lambda r: build_page_batch(r.gpa + PAGE_SIZE, r.count, PAGES[:r.count * PAGE_SIZE]), "does not match"),
    (lambda r: _good(PageRequest(r.gpa, r.count - 1, r.kind)), "does not match"),
    (_data_too_long, "malformed"),
    (lambda r: b"\x87\xa1v\x01\xa1t\xaapage_batch\xa3gpa", "malformed"),
    (lambda r: b"\x93not a page batch", "malformed"),
    (lambda r: ErrorReply(503, "busy").encode(), "503 busy"),
])
def test_a_wrong_answer_into_a_sink_is_refused(answer: Callable[[PageRequest], bytes], why: str) -> None:
    def client(url: str) -> None:
        conn = SyncPageConnection(url, "token")
        sink = PageSink(4 * PAGE_SIZE)
        try:
            with pytest.raises(FetchError, match=why):
                conn.receive(conn.send(0x10000, 4, "background"), sink)
        finally:
            sink.close()
            conn.close()

    _fake_server(answer, client)


@pytest.mark.parametrize("encode", [_good, lambda r: PageBatch.decode(_good(r)).encode()],
                         ids=["data last: into the sink", "data not last: whole, as usual"])
def test_pipelined_answers_with_pings_between_arrive_whole(encode: Callable[[PageRequest], bytes]) -> None:
    def client(url: str) -> None:
        conn = SyncPageConnection(url, "token")
        sink = PageSink(4 * PAGE_SIZE)
        try:
            requests = [conn.send(0x10000 + i * 4 * PAGE_SIZE, 4, "background") for i in range(3)]
            for request in requests:
                batch = conn.receive(request, sink)
                assert batch.gpa == request.gpa and bytes(batch.data) == PAGES
                assert (type(batch.data) is memoryview) == (encode is _good)
        finally:
            sink.close()
            conn.close()

    _fake_server(encode, client, ping=True)


# -- a scanning vCPU's huge-page windows -----------------------------------------------------

def test_a_scanning_vcpus_huge_page_windows_move_in_and_hold_the_source_pages(served: Served) -> None:
    if not Uffd.available_features() & UFFD_FEATURE_MOVE:
        pytest.skip("this kernel has no UFFDIO_MOVE (Linux < 6.8): windows are copied")
    huge = HUGE_PAGE // PAGE_SIZE
    header = served.header

    def vcpu(url: str) -> tuple[int, int, bytes]:
        memory = GuestMemory.create(served.memory.size, "anon", "sink-scan")
        prefer_huge_pages(memory)
        uffd = CountingUffd(UFFD_FEATURE_SIGBUS | UFFD_FEATURE_MISSING_SHMEM | move_feature())
        conn = SyncPageConnection(url, SERVED_TOKEN)
        try:
            uffd.register(memory.regions[0].hva, memory.size)
            tracker = PageTracker(memory, header.zero_bitmap)
            resolver = ExitModeResolver(Installer(uffd, memory, tracker, wake=False),
                                        readahead_base=huge, readahead_max=huge)
            state = VcpuFaultState(FaultDecoder(memory), conn, Readahead(huge, huge), PageSink(HUGE_PAGE))
            try:
                resolver._resolve(state, 0, 0)  # not a scan: [0, 512) fetched as any fault is, copied
                resolver._resolve(state, huge, HUGE_PAGE)  # a scan: [512, 1024) into the sink, moved
            finally:
                state.sink.close()  # type: ignore[union-attr]
            assert tracker.all_present.is_set()
            contents = memory.read(0, memory.size)
            uffd.unregister(memory.regions[0].hva, memory.size)
            return uffd.moved, uffd.copied, contents
        finally:
            conn.close()
            uffd.close()
            memory.close()

    async def main() -> tuple[int, int, bytes]:
        async with PageServer.resumed(served.memory, header, header.encode(), token=SERVED_TOKEN) as server:
            return await asyncio.to_thread(vcpu, await server.start("127.0.0.1", 0))

    moved, copied, contents = asyncio.run(main())
    assert contents == served.memory.read(0, served.memory.size)
    assert moved == copied == HUGE_PAGE * 7 // 8  # every 8th page is zero: not sent
