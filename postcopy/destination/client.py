"""The destination's connections to the source's page server (docs/protocol.md).

``SyncPageConnection`` is one blocking WebSocket: one per vCPU thread (the fault path), one per
classic handler thread and one for the background transfer (pipelined: requests answered in
order), so a demand fetch never waits behind the background stream, another vCPU, or an event
loop. The control requests (start, zero map, status, Complete) go over aiohttp.
"""
from __future__ import annotations

import ssl
from typing import NamedTuple, TypeVar

import aiohttp

from postcopy.destination.websocket import BlockingWebSocket, HandshakeError, WebSocketError
from postcopy.fastframes import ONE_PAGE_FRAME_BYTES, ONE_PAGE_FRAME_HEAD, demand_frame
from proto import (PAGE_SIZE, ErrorReply, Message, MigrationHeader, PageBatch, PageRequest, ProtoError, ZeroMap,
                   decode_any, parse_page_batch_head)
from proto.fastpath import ONE_PAGE_ANSWER_BYTES, ONE_PAGE_DATA_AT, encode_request, one_page_ok, verified_one_page
from proto.version import MAX_GPA

MSGPACK = "application/x-msgpack"
MAX_WS_MESSAGE = 8 << 20
PAGES_PATH = "/v1/pages/ws"
POLL_QUERY = "?poll=1"  # docs/protocol.md: the page worker polls for this socket's requests
DEMAND = "demand"
PAGE_OFFSET_MASK = PAGE_SIZE - 1
M = TypeVar("M", bound=Message)
# An answer this long has its fields read here and its pages taken as a view of the receive
# buffer (parse_page_batch_head), not copied by msgpack: a batch of readahead or background
# pages. Shorter ones (a demand fault's page) are decoded whole: for them one unpackb is quicker.
ZERO_COPY_MIN_BYTES = 64 << 10
# The fields before a batch's data fit in this (the largest, a 1024-page zero bitmap, is 130
# bytes): only this much is handed to the parser, which copies what it is given.
BATCH_HEAD_BYTES = 1 << 10


class FastSource(NamedTuple):
    """Where the private fault loop (private_fault_loop.py) gets a page by itself: a plain
    socket's fd and receive buffer, or (``fd`` -1) a local image's address. ``keep``: what
    the addresses point into, held by the loop's owner while the loop may use them (a
    connection closed from another thread must not free a buffer the loop's recv writes)."""

    fd: int
    buffer: int = 0
    buffer_len: int = 0
    poll_ns: int = 0
    image: int = 0
    keep: object = None


class FetchError(Exception):
    """The page server could not be reached or answered wrongly; the message says how."""


def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tls_option(ssl_context: ssl.SSLContext | None) -> ssl.SSLContext | bool:
    """aiohttp's ``ssl=`` argument: our context, or its default verification."""
    return ssl_context if ssl_context is not None else True


def decode_batch(data: bytes | memoryview, request: PageRequest) -> PageBatch:
    try:
        msg = decode_any(data)
    except ProtoError as e:
        raise _malformed(request, e) from None
    if isinstance(msg, ErrorReply):
        raise FetchError(f"page server refused {request.kind} request for gpa {request.gpa:#x}: "
                         f"{msg.code} {msg.message}")
    if not isinstance(msg, PageBatch):
        raise FetchError(f"page server answered a page request with {type(msg).__name__}")
    return checked_batch(msg, request)


def _malformed(request: PageRequest, error: ProtoError) -> FetchError:
    return FetchError(f"malformed answer to {request.kind} request for gpa {request.gpa:#x}: {error}")


def checked_batch(msg: PageBatch, request: PageRequest) -> PageBatch:
    """``msg`` if it answers ``request`` and every page matches its checksum; else FetchError."""
    try:
        msg.check_answers(request)
        msg.verify()
    except ProtoError as e:
        raise FetchError(str(e)) from None
    return msg


class SyncPageConnection:
    """The vCPU fault path's connection: a blocking WebSocket (websocket.py) owned by one
    thread, one request and one answer at a time. No event loop: a fetch is one send and,
    for a small batch, one recv."""

    def __init__(self, base_url: str, token: str, *, ssl_context: ssl.SSLContext | None = None,
                 receive_timeout: float | None = None, max_message: int = MAX_WS_MESSAGE, poll_ns: int = 0) -> None:
        self.base_url = base_url.rstrip("/")
        self.requests = 0
        self.bytes_received = 0
        try:
            # receive_timeout: a stalled answer is a FetchError after this long (a socket timeout).
            # A client that polls for its answers asks the source to poll for its requests
            # (a TLS socket does not poll: BlockingWebSocket).
            polls = poll_ns > 0 and ssl_context is None
            self.ws = BlockingWebSocket(f"{self.base_url}{PAGES_PATH}{POLL_QUERY if polls else ''}",
                                        auth_headers(token),
                                        max_message=max_message, ssl_context=ssl_context,
                                        receive_timeout=receive_timeout, poll_ns=poll_ns)
        except HandshakeError as e:
            raise FetchError(f"cannot open the page stream at {self.base_url}: HTTP {e.status}"
                             f"{_refusal(e.body)}") from None
        except WebSocketError as e:
            raise FetchError(f"cannot open the page stream at {self.base_url}: {e}") from None

    def fetch(self, gpa: int, count: int, kind: str) -> PageBatch:
        """``count`` pages from ``gpa``, checked against the request and their checksums."""
        return self.receive(self.send(gpa, count, kind))

    def fetch_page(self, gpa: int) -> int | PageBatch:
        """The fault path's fetch, one page on demand at ``gpa`` (page aligned, in guest RAM):
        the address of its data in this connection's receive buffer, checked against its
        checksum (valid until the next receive), when the answer is the fixed-layout one-page
        answer; else (a zero page, an error) what receive() makes of the answer."""
        if gpa & PAGE_OFFSET_MASK or not 0 <= gpa <= MAX_GPA - PAGE_SIZE:  # before anything is sent
            raise ValueError(f"fetch_page needs a page-aligned gpa below {MAX_GPA:#x}, got {gpa:#x}")
        self.requests += 1
        ws = self.ws
        try:
            at = ws.exchange_known(demand_frame(gpa, ws.mask_key()), ONE_PAGE_FRAME_HEAD, ONE_PAGE_FRAME_BYTES)
        except WebSocketError as e:
            raise FetchError(f"page stream broke during demand fetch of gpa {gpa:#x}: {e}") from None
        return self._one_page_answer(gpa, at)

    def fast_source(self) -> FastSource | None:
        """What the private fault loop needs to fetch one page itself (BlockingWebSocket.raw_reader),
        or None where it cannot now."""
        raw = self.ws.raw_reader()
        if raw is None:
            return None
        fd, buffer, buffer_len, poll_ns, keep = raw
        return FastSource(fd, buffer, buffer_len, poll_ns, keep=keep)

    def add_fast_requests(self, n: int) -> None:
        """Count requests the private fault loop sent (their answers, good ones, with them)."""
        self.requests += n
        self.bytes_received += n * ONE_PAGE_ANSWER_BYTES

    def finish_page(self, gpa: int, received: int, error: int) -> int | PageBatch:
        """fetch_page for a request the private fault loop sent, after it left ``received``
        bytes of the answer in the buffer (or an ``error``: BlockingWebSocket.raw_read)."""
        ws = self.ws
        try:
            ws.raw_read(received, error)
            at = ws.recv_known(ONE_PAGE_FRAME_HEAD, ONE_PAGE_FRAME_BYTES)
        except WebSocketError as e:
            raise FetchError(f"page stream broke during demand fetch of gpa {gpa:#x}: {e}") from None
        return self._one_page_answer(gpa, at)

    def _one_page_answer(self, gpa: int, at: int) -> int | PageBatch:
        """The answer to a one-page demand request, its frame head found at ``at`` (-1: another frame)."""
        ws = self.ws
        if at < 0:  # another frame: read and decoded as any answer
            return self.receive(PageRequest(gpa, 1, DEMAND))
        self.bytes_received += ONE_PAGE_ANSWER_BYTES
        if one_page_ok(ws.buffer, at, gpa):
            return ws.buffer_address + at + ONE_PAGE_DATA_AT
        # Not this page, or not matching its checksum: the general decoder says what is wrong.
        return decode_batch(memoryview(ws.buffer)[at:at + ONE_PAGE_ANSWER_BYTES], PageRequest(gpa, 1, DEMAND))

    def send(self, gpa: int, count: int, kind: str) -> PageRequest:
        """Send a request; its answer comes from ``receive`` after those of earlier requests
        (the server answers in order): so a caller may keep several in flight."""
        request = PageRequest(gpa, count, kind)  # type: ignore[arg-type]
        self.send_request(request)
        return request

    def send_request(self, request: PageRequest) -> None:
        self.requests += 1
        try:
            self.ws.send(encode_request(request.gpa, request.count, request.kind))
        except WebSocketError as e:
            raise FetchError(f"page stream broke sending a {request.kind} request for gpa {request.gpa:#x}: {e}") from None

    def receive(self, request: PageRequest) -> PageBatch:
        """The answer to the oldest request in flight, which must be ``request``. A large
        batch's data is a view of this connection's receive buffer: valid until the next
        receive (every caller installs a batch before it receives the next)."""
        try:
            answer = self.ws.recv()
        except WebSocketError as e:
            raise FetchError(f"page stream broke during {request.kind} fetch of gpa {request.gpa:#x}: {e}") from None
        self.bytes_received += answer.nbytes
        if request.count == 1:  # a fault's page: its fixed layout is checked in a few compares
            batch = verified_one_page(answer, request.gpa)
            if batch is not None:
                return batch
        elif answer.nbytes >= ZERO_COPY_MIN_BYTES:
            try:
                parsed = parse_page_batch_head(answer[:BATCH_HEAD_BYTES], answer.nbytes)
                batch = PageBatch.with_data(parsed, answer[parsed.data_offset:]) if parsed is not None else None
            except ProtoError as e:
                raise _malformed(request, e) from None
            if batch is not None:
                return checked_batch(batch, request)
        return decode_batch(answer, request)  # anything else: decoded whole

    def close(self) -> None:
        self.ws.close()


def _refusal(body: bytes) -> str:
    """The server's ErrorReply message for a refused upgrade, if its body holds one."""
    try:
        msg = decode_any(body)
    except ProtoError:
        return ""
    return f" ({msg.message})" if isinstance(msg, ErrorReply) else ""


async def start_migration(session: aiohttp.ClientSession, base_url: str, token: str) -> tuple[MigrationHeader, int]:
    """POST /v1/migration/start: the source pauses the guest and answers with its header.
    Returns the header and the size of its encoding."""
    return await control_message(session, "POST", f"{base_url}/v1/migration/start", token, MigrationHeader,
                                 "start the migration")


async def fetch_zero_map(session: aiohttp.ClientSession, base_url: str, token: str) -> tuple[ZeroMap, int]:
    """GET /v1/migration/zero-map: the paused source's zero map (after the switchover).
    Returns it and the size of its encoding."""
    return await control_message(session, "GET", f"{base_url}/v1/migration/zero-map", token, ZeroMap,
                                 "send the zero map")


async def control_message(session: aiohttp.ClientSession, method: str, url: str, token: str,
                          expected: type[M], what: str) -> tuple[M, int]:
    """One control request whose answer is one protocol message of type ``expected``; an
    ErrorReply, another message or an unreachable source is a FetchError naming ``what``."""
    try:
        async with session.request(method, url, headers=auth_headers(token)) as resp:
            body = await resp.read()
    except (aiohttp.ClientError, OSError) as e:
        raise FetchError(f"cannot ask the source at {url} to {what}: {e}") from None
    try:
        msg = decode_any(body)
    except ProtoError as e:
        raise FetchError(f"source answered {method} {url} with HTTP {resp.status} and no valid message: {e}") from None
    if isinstance(msg, ErrorReply):
        raise FetchError(f"source refused to {what}: {msg.code} {msg.message}")
    if not isinstance(msg, expected):
        raise FetchError(f"source answered {method} {url} with {type(msg).__name__}")
    return msg, len(body)
