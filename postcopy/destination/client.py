"""The destination's connections to the source's page server (docs/protocol.md).

``PageConnection`` is one aiohttp WebSocket on an event loop: requests are pipelined and
answered in order (the background stream). ``SyncPageConnection`` is one blocking WebSocket per
vCPU thread (the fault path), so a demand fetch never waits behind the background stream, another
vCPU, or an event loop.
"""
from __future__ import annotations

import asyncio
import collections
import ssl

import aiohttp

from postcopy.destination.websocket import BlockingWebSocket, HandshakeError, WebSocketError
from proto import ErrorReply, MigrationHeader, PageBatch, PageRequest, ProtoError, decode_any

MSGPACK = "application/x-msgpack"
MAX_WS_MESSAGE = 8 << 20
PAGES_PATH = "/v1/pages/ws"
# Closing waits this long for the peer's close frame: a broken stream is not waited on.
WS_CLOSE_TIMEOUT_S = 0.1


class FetchError(Exception):
    """The page server could not be reached or answered wrongly; the message says how."""


def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tls_option(ssl_context: ssl.SSLContext | None) -> ssl.SSLContext | bool:
    """aiohttp's ``ssl=`` argument: our context, or its default verification."""
    return ssl_context if ssl_context is not None else True


def _session() -> aiohttp.ClientSession:
    # One connection per session: the whole point is that nobody shares it.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=None, connect=10))


def decode_batch(data: bytes | memoryview, request: PageRequest) -> PageBatch:
    try:
        msg = decode_any(data)
    except ProtoError as e:
        raise FetchError(f"malformed answer to {request.kind} request for gpa {request.gpa:#x}: {e}") from None
    if isinstance(msg, ErrorReply):
        raise FetchError(f"page server refused {request.kind} request for gpa {request.gpa:#x}: "
                         f"{msg.code} {msg.message}")
    if not isinstance(msg, PageBatch):
        raise FetchError(f"page server answered a page request with {type(msg).__name__}")
    try:
        msg.check_answers(request)
        msg.verify()
    except ProtoError as e:
        raise FetchError(str(e)) from None
    return msg


class PageConnection:
    """A pipelined WebSocket to /v1/pages/ws; use from one event loop."""

    def __init__(self, base_url: str, token: str, *, ssl_context: ssl.SSLContext | None = None,
                 receive_timeout: float | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.ssl_context = ssl_context
        self.receive_timeout = receive_timeout  # a stalled answer is a FetchError after this long
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._waiting: collections.deque[tuple[PageRequest, asyncio.Future[PageBatch]]] = collections.deque()
        self._reader: asyncio.Task[None] | None = None
        self.requests = 0
        self.bytes_received = 0

    async def connect(self) -> None:
        self._session = _session()
        try:
            self._ws = await self._session.ws_connect(f"{self.base_url}{PAGES_PATH}", headers=auth_headers(self.token),
                                                      max_msg_size=MAX_WS_MESSAGE, autoping=False, heartbeat=None,
                                                      ssl=tls_option(self.ssl_context),
                                                      timeout=aiohttp.ClientWSTimeout(ws_receive=self.receive_timeout,
                                                                                      ws_close=WS_CLOSE_TIMEOUT_S))
        except (aiohttp.ClientError, OSError) as e:
            await self._session.close()
            raise FetchError(f"cannot open the page stream at {self.base_url}: {e}") from None

    async def fetch(self, gpa: int, count: int, kind: str) -> PageBatch:
        """One request, one answer, nobody else on this socket (the vCPU fault path)."""
        ws = self._ws
        assert ws is not None and self._reader is None
        request = PageRequest(gpa, count, kind)  # type: ignore[arg-type]
        self.requests += 1
        try:
            await ws.send_bytes(request.encode())
            msg = await ws.receive()
        except (aiohttp.ClientError, OSError, ConnectionError) as e:
            raise FetchError(f"page stream broke during {kind} fetch of gpa {gpa:#x}: {e}") from None
        if msg.type is not aiohttp.WSMsgType.BINARY:
            raise FetchError(f"page stream closed during {kind} fetch of gpa {gpa:#x} ({msg.type.name})")
        self.bytes_received += len(msg.data)
        return decode_batch(msg.data, request)

    def submit(self, gpa: int, count: int, kind: str) -> asyncio.Future[PageBatch]:
        """Send a request now and return a future for its answer (pipelined use)."""
        ws = self._ws
        assert ws is not None
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        request = PageRequest(gpa, count, kind)  # type: ignore[arg-type]
        future: asyncio.Future[PageBatch] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        self.requests += 1
        asyncio.get_running_loop().create_task(self._send(request, future))
        return future

    async def _send(self, request: PageRequest, future: asyncio.Future[PageBatch]) -> None:
        try:
            await self._ws.send_bytes(request.encode())  # type: ignore[union-attr]
        except (aiohttp.ClientError, OSError, ConnectionError) as e:
            if not future.done():
                future.set_exception(FetchError(f"page stream broke sending a request for gpa {request.gpa:#x}: {e}"))

    async def _read_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        try:
            while True:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    raise FetchError(f"page stream closed ({msg.type.name})")
                if not self._waiting:
                    raise FetchError("page server sent an answer nobody asked for")
                request, future = self._waiting.popleft()
                self.bytes_received += len(msg.data)
                if future.done():
                    continue
                try:
                    future.set_result(decode_batch(msg.data, request))
                except FetchError as e:
                    future.set_exception(e)
        except (FetchError, aiohttp.ClientError, OSError, ConnectionError) as e:
            err = e if isinstance(e, FetchError) else FetchError(f"page stream broke: {e}")
            while self._waiting:
                _, future = self._waiting.popleft()
                if not future.done():
                    future.set_exception(err)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()


class SyncPageConnection:
    """The vCPU fault path's connection: a blocking WebSocket (websocket.py) owned by one
    thread, one request and one answer at a time. No event loop: a fetch is one send and,
    for a small batch, one recv."""

    def __init__(self, base_url: str, token: str, *, ssl_context: ssl.SSLContext | None = None,
                 receive_timeout: float | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.requests = 0
        self.bytes_received = 0
        try:
            # receive_timeout: a stalled answer is a FetchError after this long (a socket timeout)
            self.ws = BlockingWebSocket(f"{self.base_url}{PAGES_PATH}", auth_headers(token),
                                        max_message=MAX_WS_MESSAGE, ssl_context=ssl_context,
                                        receive_timeout=receive_timeout)
        except HandshakeError as e:
            raise FetchError(f"cannot open the page stream at {self.base_url}: HTTP {e.status}"
                             f"{_refusal(e.body)}") from None
        except WebSocketError as e:
            raise FetchError(f"cannot open the page stream at {self.base_url}: {e}") from None

    def fetch(self, gpa: int, count: int, kind: str) -> PageBatch:
        """``count`` pages from ``gpa``, checked against the request and their checksums."""
        return self.receive(self.send(gpa, count, kind))

    def send(self, gpa: int, count: int, kind: str) -> PageRequest:
        """Send a request; its answer comes from ``receive`` after those of earlier requests
        (the server answers in order): so a caller may keep several in flight."""
        request = PageRequest(gpa, count, kind)  # type: ignore[arg-type]
        self.send_request(request)
        return request

    def send_request(self, request: PageRequest) -> None:
        self.requests += 1
        try:
            self.ws.send(request.encode())
        except WebSocketError as e:
            raise FetchError(f"page stream broke sending a {request.kind} request for gpa {request.gpa:#x}: {e}") from None

    def receive(self, request: PageRequest) -> PageBatch:
        """The answer to the oldest request in flight, which must be ``request``."""
        try:
            answer = self.ws.recv()
        except WebSocketError as e:
            raise FetchError(f"page stream broke during {request.kind} fetch of gpa {request.gpa:#x}: {e}") from None
        self.bytes_received += answer.nbytes
        return decode_batch(answer, request)

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
    try:
        async with session.post(f"{base_url}/v1/migration/start", headers=auth_headers(token)) as resp:
            body = await resp.read()
    except (aiohttp.ClientError, OSError) as e:
        raise FetchError(f"cannot start the migration at {base_url}: {e}") from None
    try:
        msg = decode_any(body)
    except ProtoError as e:
        raise FetchError(f"source answered migration start with HTTP {resp.status} and no valid message: {e}") from None
    if isinstance(msg, ErrorReply):
        raise FetchError(f"source refused to start the migration: {msg.code} {msg.message}")
    if not isinstance(msg, MigrationHeader):
        raise FetchError(f"source answered migration start with {type(msg).__name__}")
    return msg, len(body)
