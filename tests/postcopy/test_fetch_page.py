"""The fault path's fetch of one page (fetch_page) and the page server's answer to it
(fastframes.demand_gpa, PageServer.answer_page): what the fast path takes is exactly the
one-page demand request and the fixed-layout answer; anything else goes the general way, with
its errors, and is never half-accepted."""
from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postcopy import wsframe
from postcopy.destination.client import FetchError, SyncPageConnection
from postcopy.destination.exit_mode import FETCH_POLL_NS, fetch_poll_ns
from postcopy.destination.websocket import WS_GUID, BlockingWebSocket, WebSocketError
from postcopy.fastframes import DEMAND_FRAME_BYTES, ONE_PAGE_FRAME_BYTES, ONE_PAGE_FRAME_HEAD, demand_frame, demand_gpa
from postcopy.source.answers import Counts
from postcopy.source.page_server import PageServer
from proto import PAGE_SIZE, PageBatch, PageRequest, build_page_batch
from proto.fastpath import DEMAND_GPA_AT, encode_request, one_page_head
from proto.version import MAX_GPA
from vmm.machine import Machine

from fake_pages import serve_answers  # type: ignore[import-not-found]
from test_transport import GPA, GUEST_BYTES, TOKEN, serve  # type: ignore[import-not-found]

PAGE = os.urandom(PAGE_SIZE)


def _frame(payload: bytes, key: bytes) -> bytes:
    """A masked binary client frame, as BlockingWebSocket.send builds it."""
    return bytes((wsframe.FIN | wsframe.OP_BINARY, wsframe.MASKED | len(payload))) + key + wsframe.mask(payload, key)


# -- the request in its frame ----------------------------------------------------------------------

@given(gpa=st.integers(0, MAX_GPA // PAGE_SIZE - 1).map(lambda p: p * PAGE_SIZE), key=st.binary(min_size=4, max_size=4))
@settings(max_examples=200, deadline=None)
def test_demand_frame_and_demand_gpa_agree_with_the_general_encoding(gpa: int, key: bytes) -> None:
    frame = _frame(encode_request(gpa, 1, "demand"), key)
    assert len(frame) == DEMAND_FRAME_BYTES
    assert demand_frame(gpa, key) == frame  # the fault path's own build, byte for byte
    assert demand_gpa(frame) == gpa
    assert demand_gpa(bytearray(frame) + b"next frame") == gpa  # only its own bytes are read


@pytest.mark.parametrize(("payload", "why"), [
    (encode_request(GPA, 2, "demand"), "two pages"),
    (encode_request(GPA, 1, "readahead"), "another kind, same length or not"),
    (encode_request(GPA, 1, "background"), "another kind"),
    (PageRequest(GPA, 1, "demand").encode(), "the general (minimal) encoding"),
])
def test_demand_gpa_leaves_every_other_request_to_the_general_parser(payload: bytes, why: str) -> None:
    frame = bytearray(_frame(payload, b"\x11\x22\x33\x44") + bytes(DEMAND_FRAME_BYTES))
    assert demand_gpa(frame) == -1, why


def test_demand_gpa_refuses_an_unmasked_frame_a_text_frame_and_a_fragment() -> None:
    good = bytearray(_frame(encode_request(GPA, 1, "demand"), b"\x01\x02\x03\x04"))
    for at, value, why in ((1, good[1] & 0x7F, "unmasked"), (0, wsframe.FIN | wsframe.OP_TEXT, "text"),
                           (0, wsframe.OP_BINARY, "not final")):
        frame = bytearray(good)
        frame[at] = value
        assert demand_gpa(frame) == -1, why


def test_every_byte_flip_of_a_demand_frame_is_refused_or_only_names_another_gpa() -> None:
    """A flip outside the gpa's bytes (frame head, key, any other field) is refused; one inside
    them names another gpa, which the server checks like any gpa (answer_page, then answer)."""
    key = b"\x5a\xa5\x0f\xf0"
    good = _frame(encode_request(GPA, 1, "demand"), key)
    gpa_bytes = range(6 + DEMAND_GPA_AT, 6 + DEMAND_GPA_AT + 8)
    for at in range(len(good)):
        for bit in (0x01, 0x80):
            frame = bytearray(good)
            frame[at] ^= bit
            got = demand_gpa(frame)
            if at in gpa_bytes:
                assert got not in (-1, GPA), at
            else:
                assert got == -1, (at, bit)


# -- the answer, through a real page server ---------------------------------------------------------

@pytest.mark.usefixtures("kvm_available")
def test_fetch_page_gives_the_checked_page_in_place_and_the_server_counts_its_answers() -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        conn = await asyncio.to_thread(SyncPageConnection, url, TOKEN)
        gpas = [GPA + i * 7 * PAGE_SIZE for i in range(40)]
        try:
            for gpa in gpas:
                address = await asyncio.to_thread(conn.fetch_page, gpa)
                assert isinstance(address, int)
                assert ctypes.string_at(address, PAGE_SIZE) == machine.memory.read(gpa, PAGE_SIZE)
            # answered by the sockets' fast path, and counted as any demand page
            assert sum(server._board.counts(slot)[Counts.FAST_PAGES] for slot in server._sockets.values()) == len(gpas)
            stats = server.stats()
            assert stats["requests"]["demand"] == len(gpas) and stats["pages_data"] == len(gpas)
            assert stats["batch_bytes"] == len(gpas) * (ONE_PAGE_FRAME_BYTES - len(ONE_PAGE_FRAME_HEAD))
            assert conn.requests == len(gpas)
        finally:
            await asyncio.to_thread(conn.close)
        for _ in range(100):  # the socket's count outlives the socket
            if not server._sockets:
                break
            await asyncio.sleep(0.01)
        assert not server._sockets and server.stats()["requests"]["demand"] == len(gpas)

    serve(body)


@pytest.mark.usefixtures("kvm_available")
def test_fetch_page_of_a_zero_page_or_one_past_ram_goes_the_general_way_and_an_unaligned_gpa_is_refused() -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        zero_gpa = GUEST_BYTES - PAGE_SIZE  # a zero page, whatever the guest wrote before its pause
        machine.memory.write(zero_gpa, bytes(PAGE_SIZE))
        conn = await asyncio.to_thread(SyncPageConnection, url, TOKEN)
        try:
            batch = await asyncio.to_thread(conn.fetch_page, zero_gpa)
            assert isinstance(batch, PageBatch) and (batch.gpa, batch.count, batch.zero) == (zero_gpa, 1, b"\x01")
            with pytest.raises(FetchError, match="416"):
                await asyncio.to_thread(conn.fetch_page, GUEST_BYTES)
            with pytest.raises(ValueError, match="page-aligned"):  # refused before it is sent
                await asyncio.to_thread(conn.fetch_page, GPA + 8)
            address = await asyncio.to_thread(conn.fetch_page, GPA)  # the socket stays usable
            assert ctypes.string_at(address, PAGE_SIZE) == machine.memory.read(GPA, PAGE_SIZE)
        finally:
            await asyncio.to_thread(conn.close)
        stats = server.stats()
        assert stats["errors"] == {"416": 1}
        assert stats["requests"]["demand"] == 2 and stats["pages_zero"] == 1 and stats["pages_data"] == 1  # errors: not counted

    serve(body)


@pytest.mark.usefixtures("kvm_available")
def test_fetch_page_before_the_switchover_is_refused_with_its_code() -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        conn = await asyncio.to_thread(SyncPageConnection, url, TOKEN)
        try:
            with pytest.raises(FetchError, match="409"):
                await asyncio.to_thread(conn.fetch_page, GPA)
        finally:
            await asyncio.to_thread(conn.close)

    serve(body, start=False)


# -- tampered answers -------------------------------------------------------------------------------

def _fixed_answer(request: PageRequest) -> bytes:
    return one_page_head(request.gpa, PAGE) + PAGE


def _fetch_page_against(answer_of: object, gpa: int = GPA, *, ping: bool = False) -> int | PageBatch | FetchError:
    """What fetch_page gives (or raises) against a server answering with ``answer_of(request)``."""
    outcome: list[int | PageBatch | FetchError] = []

    def client(url: str) -> None:
        conn = SyncPageConnection(url, TOKEN, receive_timeout=5)
        try:
            got = conn.fetch_page(gpa)
            outcome.append(ctypes.string_at(got, PAGE_SIZE) if isinstance(got, int) else got)  # type: ignore[arg-type]
        except FetchError as e:
            outcome.append(e)
        finally:
            conn.close()

    serve_answers(answer_of, client, ping=ping)  # type: ignore[arg-type]
    return outcome[0]


def test_the_fixed_layout_answer_is_taken_in_place_and_behind_a_ping_the_general_way() -> None:
    assert _fetch_page_against(_fixed_answer) == PAGE
    behind_a_ping = _fetch_page_against(_fixed_answer, ping=True)
    assert isinstance(behind_a_ping, PageBatch) and behind_a_ping.data == PAGE


def test_a_one_page_answer_in_the_general_encoding_is_decoded_and_checked() -> None:
    got = _fetch_page_against(lambda r: build_page_batch(r.gpa, 1, PAGE))
    assert isinstance(got, PageBatch) and got.data == PAGE


@pytest.mark.parametrize("at", sorted({*range(0, 80), *range(80, ONE_PAGE_FRAME_BYTES - 4, 397), ONE_PAGE_FRAME_BYTES - 5}))
def test_a_flipped_byte_of_the_fixed_layout_answer_is_refused_or_harmless(at: int) -> None:
    """Every byte of the batch head, and page bytes across the page: a flip is a FetchError
    (wrong gpa, layout, checksum) or, where it still makes a valid answer, the right page."""
    def flipped(request: PageRequest) -> bytes:
        answer = bytearray(_fixed_answer(request))
        answer[at] ^= 0x04
        return bytes(answer)

    got = _fetch_page_against(flipped)
    assert isinstance(got, FetchError) or got == PAGE or (isinstance(got, PageBatch) and got.data == PAGE), (at, got)


# -- a frame that comes in pieces -------------------------------------------------------------------

@pytest.fixture
def raw_server() -> Iterator[tuple[str, list[bytes]]]:
    """A WebSocket peer on a bare socket: it answers the upgrade, reads one request frame and
    sends the chunks the test put in the list, 20 ms apart."""
    listener = socket.create_server(("127.0.0.1", 0))
    chunks: list[bytes] = []

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key"))
            import base64
            import hashlib
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            got = b""
            while len(got) < DEMAND_FRAME_BYTES:
                got += conn.recv(4096)
            for chunk in chunks:
                conn.sendall(chunk)
                time.sleep(0.02)
            conn.recv(4096)  # the close frame

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", chunks
    thread.join(5)
    listener.close()


# poll_ns: none; shorter than the 20 ms between pieces (it polls, then sleeps in recv); longer
@pytest.mark.parametrize("poll_ns", [0, 200_000, 2_000_000_000])
@pytest.mark.parametrize("cuts", [(1,), (3, 40), (ONE_PAGE_FRAME_BYTES - 1,), (2, 4, 100, 2000)])
def test_an_answer_that_arrives_in_pieces_is_read_whole(raw_server: tuple[str, list[bytes]], cuts: tuple[int, ...],
                                                       poll_ns: int) -> None:
    url, chunks = raw_server
    frame = ONE_PAGE_FRAME_HEAD + one_page_head(GPA, PAGE) + PAGE
    edges = [0, *cuts, len(frame)]
    chunks += [frame[a:b] for a, b in zip(edges, edges[1:])]
    ws = BlockingWebSocket(f"{url}/v1/pages/ws", {}, max_message=8 << 20, receive_timeout=5, poll_ns=poll_ns)
    assert ws.poll_ns == poll_ns
    try:
        ws.send(encode_request(GPA, 1, "demand"))
        at = ws.recv_known(ONE_PAGE_FRAME_HEAD, ONE_PAGE_FRAME_BYTES)
        assert bytes(ws.buffer[at:at + len(frame) - len(ONE_PAGE_FRAME_HEAD)]) == frame[len(ONE_PAGE_FRAME_HEAD):]
    finally:
        ws.close()


def test_a_polling_socket_still_times_out_when_no_answer_comes(raw_server: tuple[str, list[bytes]]) -> None:
    url, _ = raw_server  # the peer reads the request and answers nothing
    ws = BlockingWebSocket(f"{url}/v1/pages/ws", {}, max_message=8 << 20, receive_timeout=0.2, poll_ns=50_000_000)
    try:
        ws.send(encode_request(GPA, 1, "demand"))
        t0 = time.monotonic()
        with pytest.raises(WebSocketError, match="timed out"):
            ws.recv_known(ONE_PAGE_FRAME_HEAD, ONE_PAGE_FRAME_BYTES)
        assert 0.2 <= time.monotonic() - t0 < 2.0  # the poll, then the kernel's receive timeout
    finally:
        ws.close()


def test_only_a_single_vcpu_polls_for_its_page() -> None:
    assert fetch_poll_ns(1) == FETCH_POLL_NS > 0
    assert fetch_poll_ns(2) == fetch_poll_ns(4) == 0


def test_a_known_frame_over_the_connections_limit_is_left_to_recv_which_refuses_it(
        raw_server: tuple[str, list[bytes]]) -> None:
    url, chunks = raw_server
    chunks.append(ONE_PAGE_FRAME_HEAD + one_page_head(GPA, PAGE) + PAGE)
    ws = BlockingWebSocket(f"{url}/v1/pages/ws", {}, max_message=1024, receive_timeout=5)
    try:
        ws.send(encode_request(GPA, 1, "demand"))
        assert ws.recv_known(ONE_PAGE_FRAME_HEAD, ONE_PAGE_FRAME_BYTES) == -1
        with pytest.raises(WebSocketError, match="bad frame"):
            ws.recv()
    finally:
        ws.close()


def test_another_frame_is_left_whole_for_recv(raw_server: tuple[str, list[bytes]]) -> None:
    url, chunks = raw_server
    other = build_page_batch(GPA, 1, PAGE)  # a shorter frame: its head differs
    chunks += [wsframe.header(wsframe.OP_BINARY, len(other), masked=False)[:1],
               wsframe.header(wsframe.OP_BINARY, len(other), masked=False)[1:] + other]
    ws = BlockingWebSocket(f"{url}/v1/pages/ws", {}, max_message=8 << 20, receive_timeout=5)
    try:
        ws.send(encode_request(GPA, 1, "demand"))
        assert ws.recv_known(ONE_PAGE_FRAME_HEAD, ONE_PAGE_FRAME_BYTES) == -1
        assert bytes(ws.recv()) == other
    finally:
        ws.close()


@pytest.mark.parametrize(("poll_ns", "tls", "asks"), [(200_000, False, True), (0, False, False), (200_000, True, False)])
def test_a_connection_asks_its_page_worker_to_poll_only_where_it_polls_itself(monkeypatch: pytest.MonkeyPatch,
                                                                             poll_ns: int, tls: bool, asks: bool) -> None:
    # ?poll=1 where this end polls for its answers: over plain TCP with a polling window (a TLS
    # socket never polls, so it does not ask).
    import ssl

    from postcopy.destination import client
    urls: list[str] = []

    class Recorded:
        def __init__(self, url: str, *args: object, **kwargs: object) -> None:
            urls.append(url)

    monkeypatch.setattr(client, "BlockingWebSocket", Recorded)
    client.SyncPageConnection("http://127.0.0.1:9", "t", poll_ns=poll_ns,
                              ssl_context=ssl.create_default_context() if tls else None)
    assert urls == ["http://127.0.0.1:9/v1/pages/ws" + ("?poll=1" if asks else "")]
