"""Large page answers decoded without copying their pages: the destination reads a batch's
fields itself (parse_page_batch_head) and takes its data as a view of the connection's receive
buffer. Against a real page server on loopback (a whole background transfer), and against a fake
one that answers wrongly (every wrong answer refused before anything is installed)."""
from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable

import pytest

from postcopy.destination.background import run_background, transfer
from postcopy.destination.client import ZERO_COPY_MIN_BYTES, FetchError, SyncPageConnection
from postcopy.destination.install import Installer
from postcopy.destination.pages import PageTracker
from postcopy.source.page_server import PageServer
from fake_pages import serve_answers  # type: ignore[import-not-found]
from proto import PAGE_SIZE, ErrorReply, PageBatch, PageRequest, page_batch_parts
from served_memory import SERVED_TOKEN, Served  # type: ignore[import-not-found]
from vmm.abi.userfaultfd import UFFD_FEATURE_MISSING_SHMEM
from vmm.memory import GuestMemory
from vmm.uffd import Uffd

PAGES_PER_ANSWER = 2 * ZERO_COPY_MIN_BYTES // PAGE_SIZE
PAGES = os.urandom(PAGES_PER_ANSWER * PAGE_SIZE)


@pytest.mark.usefixtures("uffd_available")
def test_a_background_transfer_of_large_batches_leaves_ram_holding_the_sources_pages(served: Served) -> None:
    header = served.header

    def pull(url: str) -> bytes:
        memory = GuestMemory.create(served.memory.size, "anon", "zero-copy-test")
        uffd = Uffd(UFFD_FEATURE_MISSING_SHMEM)
        connection = SyncPageConnection(url, SERVED_TOKEN)
        try:
            uffd.register(memory.regions[0].hva, memory.size)
            tracker = PageTracker(memory)  # no zero map: every page is fetched
            transfer(connection, Installer(uffd, memory, tracker, wake=False), threading.Event())
            assert tracker.all_present.is_set()
            contents = memory.read(0, memory.size)
            uffd.unregister(memory.regions[0].hva, memory.size)
            return contents
        finally:
            connection.close()
            uffd.close()
            memory.close()

    async def main() -> bytes:
        async with PageServer.resumed(served.memory, header, header.encode(), token=SERVED_TOKEN) as server:
            return await asyncio.to_thread(pull, await server.start("127.0.0.1", 0))

    # every 8th page of the served pattern is zero: runs of data and zero pages in every batch
    assert asyncio.run(main()) == served.memory.read(0, served.memory.size)


@pytest.mark.usefixtures("uffd_available")
@pytest.mark.parametrize("broken", [False, True], ids=["three-streams", "one-stream-broken"])
def test_background_streams_share_the_pages_or_end_together_on_an_error(served: Served, broken: bool) -> None:
    """run_background with several connections: each claims its own batches from the one
    tracker, so together they install every page once (their requests add up to a transfer);
    a stream that fails ends them all with its error."""
    header = served.header

    def pull(url: str) -> tuple[bytes, list[int]]:
        memory = GuestMemory.create(served.memory.size, "anon", "streams-test")
        uffd = Uffd(UFFD_FEATURE_MISSING_SHMEM)
        connections = [SyncPageConnection(url, SERVED_TOKEN) for _ in range(3)]
        # Each answer taken 1 ms late, so that one stream cannot take every batch before the
        # others' threads first run on a busy host (it did in a suite run beside a CPU hog).
        for c in connections:
            receive = c.receive
            c.receive = lambda request, receive=receive: (time.sleep(0.001), receive(request))[1]  # type: ignore[method-assign]
        try:
            uffd.register(memory.regions[0].hva, memory.size)
            tracker = PageTracker(memory)
            if broken:
                connections[1].close()
                with pytest.raises(FetchError):
                    asyncio.run(run_background(connections, Installer(uffd, memory, tracker, wake=False), batch_pages=16))
                return b"", []
            asyncio.run(run_background(connections, Installer(uffd, memory, tracker, wake=False), batch_pages=16))
            assert tracker.all_present.is_set() and tracker.present == memory.pages
            contents = memory.read(0, memory.size)
            uffd.unregister(memory.regions[0].hva, memory.size)
            return contents, [c.requests for c in connections]
        finally:
            for c in connections:
                c.close()
            uffd.close()
            memory.close()

    async def main() -> tuple[bytes, list[int]]:
        async with PageServer.resumed(served.memory, header, header.encode(), token=SERVED_TOKEN) as server:
            return await asyncio.to_thread(pull, await server.start("127.0.0.1", 0))

    contents, requests = asyncio.run(main())
    if not broken:
        assert contents == served.memory.read(0, served.memory.size)
        assert sum(requests) == -(-served.memory.pages // 16)  # every batch asked for once, by one stream
        assert sum(1 for n in requests if n) >= 2, f"one stream did all the work: {requests}"


def _good(request: PageRequest) -> bytes:
    return b"".join(page_batch_parts(request.gpa, request.count, PAGES[:request.count * PAGE_SIZE]))


def _corrupted(request: PageRequest) -> bytes:
    batch = bytearray(_good(request))
    batch[-100] ^= 0xFF  # inside the page data
    return bytes(batch)


def _data_too_long(request: PageRequest) -> bytes:
    """A data entry whose bin length says more than the message holds."""
    head, data = page_batch_parts(request.gpa, request.count, PAGES[:request.count * PAGE_SIZE])
    head = bytearray(head)
    head[-4:] = (len(data) + PAGE_SIZE).to_bytes(4, "big")
    return bytes(head) + bytes(data)


@pytest.mark.parametrize(("answer", "why"), [
    (_corrupted, "checksum"),
    (lambda r: _good(PageRequest(r.gpa + PAGE_SIZE, r.count, r.kind)), "does not match"),
    (lambda r: _good(PageRequest(r.gpa, r.count - 1, r.kind)), "does not match"),
    (_data_too_long, "malformed"),
    (lambda r: b"\x87\xa1v\x02\xa1t\xaapage_batch\xa3gpa" + bytes(ZERO_COPY_MIN_BYTES), "malformed"),
    (lambda r: b"\x93not a page batch" + bytes(ZERO_COPY_MIN_BYTES), "malformed"),
    (lambda r: ErrorReply(503, "busy").encode(), "503 busy"),
])
def test_a_wrong_large_answer_is_refused(answer: Callable[[PageRequest], bytes], why: str) -> None:
    def client(url: str) -> None:
        conn = SyncPageConnection(url, "token")
        try:
            with pytest.raises(FetchError, match=why):
                conn.fetch(0x10000, PAGES_PER_ANSWER, "background")
        finally:
            conn.close()

    serve_answers(answer, client)


@pytest.mark.parametrize("encode", [_good, lambda r: PageBatch.decode(_good(r)).encode()],
                         ids=["data last: a view of the receive buffer", "data not last: decoded whole"])
def test_pipelined_large_answers_with_pings_between_arrive_whole(encode: Callable[[PageRequest], bytes]) -> None:
    def client(url: str) -> None:
        conn = SyncPageConnection(url, "token")
        try:
            requests = [conn.send(0x100000 + i * len(PAGES), PAGES_PER_ANSWER, "background") for i in range(3)]
            for request in requests:
                batch = conn.receive(request)
                assert batch.gpa == request.gpa and bytes(batch.data) == PAGES
                assert (type(batch.data) is memoryview) == (encode is _good)
        finally:
            conn.close()

    serve_answers(encode, client, ping=True)
