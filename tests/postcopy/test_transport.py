"""The destination's blocking page connection against a live page server (a real paused guest,
real WebSockets on 127.0.0.1), and the page server's fast path at the frame level."""
from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import time
from collections.abc import Awaitable, Callable

import aiohttp
import msgpack
import pytest

from postcopy import wsframe
from postcopy.destination.client import FetchError, SyncPageConnection
from postcopy.destination.websocket import BlockingWebSocket
from postcopy.source.page_server import PageServer
from postcopy.source.page_workers import DEFAULT_POLL_US
from postcopy.source.run import boot_memtouch
from fake_pages import serve_answers  # type: ignore[import-not-found]
from proto import PAGE_SIZE, PROTOCOL_VERSION, ErrorReply, PageBatch, PageRequest, build_page_batch, decode_any
from vmm.machine import Machine

TOKEN = "transport-token"
GUEST_BYTES = 16 << 20
GPA = 0x200000


def serve(body: Callable[[PageServer, Machine, str], Awaitable[None]], *, start: bool = True,
          page_workers: bool = True, page_poll_us: int = DEFAULT_POLL_US) -> None:
    """A page server over a booted (then paused) memtouch guest; ``body`` runs on its loop and
    calls the blocking client through asyncio.to_thread."""
    async def main() -> None:
        machine, workload = boot_memtouch(GUEST_BYTES, 1, seed=5)
        try:
            await asyncio.sleep(0.1)
            async with PageServer(machine, token=TOKEN, migration_id="transport-test", workload=workload,
                                  page_workers=page_workers, page_poll_us=page_poll_us) as server:
                url = await server.start("127.0.0.1", 0)
                if start:
                    async with aiohttp.ClientSession() as http:
                        async with http.post(f"{url}/v1/migration/start",
                                             headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                            assert response.status == 200
                await body(server, machine, url)
        finally:
            machine.close()

    asyncio.run(main())


def _pages(batch: PageBatch) -> bytes:
    out = bytearray()
    for _, npages, data in batch.runs():
        out += bytes(npages * PAGE_SIZE) if data is None else data
    return bytes(out)


@pytest.mark.usefixtures("kvm_available")
def test_blocking_fetch_returns_the_guests_pages_verified() -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        conn = await asyncio.to_thread(SyncPageConnection, url, TOKEN)
        try:
            for gpa, count in ((GPA, 1), (GPA + 8 * PAGE_SIZE, 64), (GPA, 1024)):
                batch = await asyncio.to_thread(conn.fetch, gpa, count, "demand")
                assert (batch.gpa, batch.count) == (gpa, count)
                assert _pages(batch) == machine.memory.read(gpa, count * PAGE_SIZE)
            assert conn.requests == 3 and conn.bytes_received > 0
        finally:
            conn.close()
        assert server.stats()["requests"]["demand"] == 3

    serve(body)


def _resident_kib(address: int, length: int) -> int:
    """How much of [address, address + length) is resident (mincore(2)), in KiB: the range
    alone, which /proc/self/smaps does not give where the kernel merged the mapping with its
    neighbours."""
    start = address & ~(PAGE_SIZE - 1)
    length += address - start
    pages = (length + PAGE_SIZE - 1) // PAGE_SIZE
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec):
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec) * PAGE_SIZE // 1024


@pytest.mark.usefixtures("kvm_available")
def test_a_connections_receive_buffer_is_resident_only_where_answers_came() -> None:
    """A vCPU's connection takes 8 MiB answers at most, and one-page answers mostly: its
    buffer costs the destination's RSS what it received, not 8 MiB (a bytearray writes its
    zeros), for each vCPU's connection, prefetcher and background stream."""
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        conn = await asyncio.to_thread(SyncPageConnection, url, TOKEN)
        try:
            address, length = conn.ws.buffer_address, conn.ws.max_message
            assert _resident_kib(address, length) <= 64
            for i in range(20):
                await asyncio.to_thread(conn.fetch_page, GPA + i * PAGE_SIZE)
            assert _resident_kib(address, length) <= 64  # one page's answer, read at the front each time
            batch = await asyncio.to_thread(conn.fetch, GPA, 256, "background")
            assert _pages(batch) == machine.memory.read(GPA, 256 * PAGE_SIZE)
            assert 1024 <= _resident_kib(address, length) <= 2048  # 1 MiB of pages came
        finally:
            conn.close()

    serve(body)


@pytest.mark.usefixtures("kvm_available")
def test_a_wrong_token_is_a_fetch_error_naming_401() -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        with pytest.raises(FetchError, match="401"):
            await asyncio.to_thread(SyncPageConnection, url, "not-the-token")

    serve(body)


@pytest.mark.usefixtures("kvm_available")
def test_a_server_that_closes_the_socket_is_a_fetch_error() -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        conn = await asyncio.to_thread(SyncPageConnection, url, TOKEN)
        await server.close()  # closes every page socket with 1001
        with pytest.raises(FetchError, match="1001|closed"):
            await asyncio.to_thread(conn.fetch, GPA, 1, "demand")
        conn.close()

    serve(body)


@pytest.mark.usefixtures("kvm_available")
def test_a_refusal_before_the_switchover_is_a_fetch_error_with_its_code() -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        conn = await asyncio.to_thread(SyncPageConnection, url, TOKEN)
        with pytest.raises(FetchError, match="409"):
            await asyncio.to_thread(conn.fetch, GPA, 1, "demand")
        # An ErrorReply leaves the socket usable: after the switchover a bad range is refused
        # the same way, and a good request on the same socket is answered.
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/migration/start", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200
        with pytest.raises(FetchError, match="416"):
            await asyncio.to_thread(conn.fetch, GUEST_BYTES, 1, "demand")
        batch = await asyncio.to_thread(conn.fetch, GPA, 2, "demand")
        assert _pages(batch) == machine.memory.read(GPA, 2 * PAGE_SIZE)
        conn.close()

    serve(body, start=False)


def fake_server(answer: Callable[[PageRequest], bytes]) -> Callable[[Callable[[str], None]], None]:
    """An aiohttp WebSocket server that answers each request with ``answer(request)``."""
    return lambda client: serve_answers(answer, client)


PAGES = os.urandom(4 * PAGE_SIZE)


def _corrupted(request: PageRequest) -> bytes:
    batch = bytearray(build_page_batch(request.gpa, request.count, PAGES[:request.count * PAGE_SIZE]))
    batch[-100] ^= 0xFF  # inside the page data
    return bytes(batch)


@pytest.mark.parametrize(("answer", "why"), [
    (_corrupted, "checksum"),
    (lambda r: build_page_batch(r.gpa + PAGE_SIZE, r.count, PAGES[:r.count * PAGE_SIZE]), "does not match"),
    (lambda r: b"\x93not a page batch", "malformed"),
    (lambda r: ErrorReply(503, "busy").encode(), "503 busy"),
])
def test_a_wrong_answer_is_refused_and_nothing_is_returned(answer: Callable[[PageRequest], bytes], why: str) -> None:
    def client(url: str) -> None:
        conn = SyncPageConnection(url, TOKEN)
        try:
            with pytest.raises(FetchError, match=why):
                conn.fetch(0x10000, 2, "demand")
        finally:
            conn.close()

    fake_server(answer)(client)


def test_the_good_answer_of_the_fake_server_passes() -> None:
    def client(url: str) -> None:
        conn = SyncPageConnection(url, TOKEN)
        try:
            assert conn.fetch(0x10000, 4, "demand").data == PAGES
        finally:
            conn.close()

    fake_server(lambda r: build_page_batch(r.gpa, r.count, PAGES[:r.count * PAGE_SIZE]))(client)


@pytest.mark.usefixtures("kvm_available")
def test_the_fast_path_answers_frames_split_across_reads_pings_and_text() -> None:
    """Raw frames over a blocking WebSocket: a request sent in pieces, two in one write, a ping
    and a text frame all get their answers, in order."""
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        def client() -> None:
            ws = BlockingWebSocket(f"{url}/v1/pages/ws", {"Authorization": f"Bearer {TOKEN}"}, max_message=8 << 20)
            assert ws.sock is not None
            try:
                def frame(payload: bytes, opcode: int = wsframe.OP_BINARY) -> bytes:
                    key = os.urandom(4)
                    return wsframe.header(opcode, len(payload), masked=True) + key + wsframe.mask(payload, key)

                one = frame(PageRequest(GPA, 1, "demand").encode())
                for piece in (one[:1], one[1:5], one[5:]):  # TCP_NODELAY: separate reads there
                    ws.sock.sendall(piece)
                    time.sleep(0.01)
                first = decode_any(ws.recv())
                assert isinstance(first, PageBatch) and first.gpa == GPA
                two = frame(PageRequest(GPA + PAGE_SIZE, 1, "demand").encode())
                ws.sock.sendall(two + frame(b"ping!", wsframe.OP_PING) + frame(b"hello", wsframe.OP_TEXT) + one)
                answers = [decode_any(ws.recv()) for _ in range(3)]  # the pong is read past
                assert isinstance(answers[0], PageBatch) and answers[0].gpa == GPA + PAGE_SIZE
                assert isinstance(answers[1], ErrorReply) and answers[1].code == 400
                assert isinstance(answers[2], PageBatch) and answers[2].gpa == GPA
            finally:
                ws.close()

        await asyncio.to_thread(client)

    serve(body)


@pytest.mark.usefixtures("kvm_available")
def test_an_oversized_frame_closes_the_socket_with_1009() -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        def client() -> None:
            ws = BlockingWebSocket(f"{url}/v1/pages/ws", {"Authorization": f"Bearer {TOKEN}"}, max_message=8 << 20)
            ws.send(bytes(128 * 1024))
            with pytest.raises(Exception, match="1009"):
                ws.recv()
            ws.close()

        await asyncio.to_thread(client)

    serve(body)


@pytest.mark.usefixtures("kvm_available")
def test_an_unmasked_client_frame_closes_the_socket_with_1002() -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        def client() -> None:
            ws = BlockingWebSocket(f"{url}/v1/pages/ws", {"Authorization": f"Bearer {TOKEN}"}, max_message=8 << 20)
            assert ws.sock is not None
            request = PageRequest(GPA, 1, "demand").encode()
            ws.sock.sendall(wsframe.header(wsframe.OP_BINARY, len(request), masked=False) + request)
            with pytest.raises(Exception, match="1002"):
                ws.recv()
            ws.close()

        await asyncio.to_thread(client)

    serve(body)


def test_closing_the_server_aborts_a_socket_whose_peer_reads_no_answers(served) -> None:  # type: ignore[no-untyped-def]
    """Answers buffered for a peer that stopped reading are views of guest RAM: close() must
    drop them (abort) within its grace, not leave them to be written after the RAM is gone."""
    from postcopy.source.page_server import SOCKET_CLOSE_TIMEOUT_S
    from served_memory import SERVED_TOKEN  # type: ignore[import-not-found]

    async def main() -> None:
        header = served.header
        server = PageServer.resumed(served.memory, header, header.encode(), token=SERVED_TOKEN)
        url = await server.start("127.0.0.1", 0)
        ws = await asyncio.to_thread(BlockingWebSocket, f"{url}/v1/pages/ws",
                                     {"Authorization": f"Bearer {SERVED_TOKEN}"}, max_message=8 << 20)
        assert ws.sock is not None
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the peer takes almost nothing
        request = PageRequest(0, served.memory.pages, "background").encode()
        for _ in range(64):  # 64 x 4 MiB of answers: far more than the socket buffers hold
            await asyncio.to_thread(ws.send, request)
        await asyncio.sleep(0.3)
        assert server.stats()["requests"]["background"] >= 1 and server._sockets
        t0 = time.monotonic()
        await server.close()
        took = time.monotonic() - t0
        assert SOCKET_CLOSE_TIMEOUT_S * 0.9 <= took < SOCKET_CLOSE_TIMEOUT_S + 2.0
        assert not server._sockets  # the handler saw the socket go
        ws.close()

    asyncio.run(main())


@pytest.mark.usefixtures("kvm_available")
def test_fixed_layout_requests_out_of_range_or_invalid_get_clear_errors_and_the_socket_stays_usable() -> None:
    """The server's fast request path (proto/fastpath.py) refuses what the general path refuses,
    with its messages: a page past guest RAM is a 416, a count of 0 a 400."""
    from proto.fastpath import encode_request

    async def body(server: PageServer, machine: Machine, url: str) -> None:
        def client() -> None:
            ws = BlockingWebSocket(f"{url}/v1/pages/ws", {"Authorization": f"Bearer {TOKEN}"}, max_message=8 << 20)
            try:
                ws.send(encode_request(GUEST_BYTES, 1, "demand"))
                refused = decode_any(ws.recv())
                assert isinstance(refused, ErrorReply) and refused.code == 416 and "region" in refused.message
                zero_count = bytearray(encode_request(GPA, 1, "demand"))
                at = zero_count.index(b"\xa5count\xcd") + len(b"\xa5count\xcd")
                zero_count[at:at + 2] = b"\x00\x00"
                ws.send(bytes(zero_count))
                refused = decode_any(ws.recv())
                assert isinstance(refused, ErrorReply) and refused.code == 400 and "count" in refused.message
                # A kind that is a map (unhashable): refused like any bad field, not a dropped socket.
                ws.send(msgpack.packb({"v": PROTOCOL_VERSION, "t": "page_request", "gpa": GPA, "count": 1, "kind": {}}))
                refused = decode_any(ws.recv())
                assert isinstance(refused, ErrorReply) and refused.code == 400 and "kind" in refused.message
                ws.send(encode_request(GPA, 1, "demand"))
                page = decode_any(ws.recv())
                assert isinstance(page, PageBatch) and page.data == machine.memory.read(GPA, PAGE_SIZE)
            finally:
                ws.close()

        await asyncio.to_thread(client)
        assert server.stats()["errors"] == {"416": 1, "400": 2}

    serve(body)


def _pid_of(pidfd: int) -> int:
    for line in open(f"/proc/self/fdinfo/{pidfd}"):
        if line.startswith("Pid:"):
            return int(line.split()[1])
    raise AssertionError(f"fd {pidfd} is no pidfd")


@pytest.mark.usefixtures("kvm_available")
@pytest.mark.parametrize("workers", [True, False], ids=["page workers", "threads"])
def test_sockets_answering_on_their_own_count_every_request_and_end_with_their_client(workers: bool) -> None:
    """Plain TCP page sockets of a shared-RAM guest are each served by a page worker (a
    process) unless the server is told otherwise; either way the server counts every answer,
    and each ends, its worker reaped, when its client closes."""
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        sockets, fetches = 4, 200
        assert server.page_workers == workers  # memfd RAM: workers unless told

        def client(index: int) -> None:
            conn = SyncPageConnection(url, TOKEN)
            try:
                for i in range(fetches):
                    gpa = GPA + ((index * fetches + i) % 512) * PAGE_SIZE
                    batch = conn.fetch(gpa, 1, "demand")
                    assert batch.data == machine.memory.read(gpa, PAGE_SIZE)
            finally:
                conn.close()

        probe = await asyncio.to_thread(SyncPageConnection, url, TOKEN)
        (served,) = server._sockets
        assert type(served).__name__ == ("WorkerPageSocket" if workers else "ThreadedPageSocket")
        assert server.stats()["page_sockets"] == {"worker": int(workers), "thread": int(not workers), "loop": 0}
        await asyncio.to_thread(probe.fetch, GPA, 1, "demand")  # answered: a worker is set up by now
        if workers:
            pid = _pid_of(served.pidfd)  # type: ignore[attr-defined]
            assert pid != os.getpid() and open(f"/proc/{pid}/comm").read().strip() == "page-worker"
            # it kept no descriptor but its connection's (no socket, pipe, eventfd or epoll of the
            # page server's), and it maps guest RAM read-only
            kept = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) > 2]
            assert len(kept) == 1 and kept[0].startswith("socket:"), kept
            ram = [line.split()[1] for line in open(f"/proc/{pid}/maps") if "memfd:" in line and "board" not in line]
            assert ram and set(ram) == {"r--s"}, ram
        await asyncio.to_thread(probe.close)
        if workers:
            for _ in range(300):  # exits, and its fork server collects it
                if not os.path.exists(f"/proc/{pid}"):
                    break
                await asyncio.sleep(0.01)
            assert not os.path.exists(f"/proc/{pid}")
        await asyncio.gather(*(asyncio.to_thread(client, i) for i in range(sockets)))
        stats = server.stats()
        assert stats["requests"]["demand"] == sockets * fetches + 1
        assert stats["pages_data"] + stats["pages_zero"] == sockets * fetches + 1
        for _ in range(100):  # each socket's thread or worker ends when its client closes
            if not server._sockets:
                break
            await asyncio.sleep(0.01)
        assert not server._sockets

    serve(body, page_workers=workers)


@pytest.mark.parametrize("sent", [0, 1, 3, 4, 5, 9, 10])
def test_a_send_cut_short_goes_on_from_where_it_stopped(sent: int) -> None:
    """sendmsg on a blocking socket sends everything unless a signal cuts it short: the rest,
    across the parts, follows in order."""
    from postcopy.source.page_socket import ThreadedPageSocket

    class Sock:
        def __init__(self) -> None:
            self.out = bytearray()

        def sendall(self, data: bytes | memoryview) -> None:
            self.out += data

    class Cut:
        _sock = Sock()

    message: list[bytes | memoryview] = [b"abcd", memoryview(b"efghi"), b"j"]
    ThreadedPageSocket._send_rest(Cut, message, sent)  # type: ignore[arg-type]
    assert bytes(Cut._sock.out) == b"abcdefghij"[sent:]
