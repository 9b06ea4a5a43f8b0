"""The destination's connections to the source's page server (docs/protocol.md).

``PageConnection`` is one WebSocket: requests may be pipelined and are answered in order. Each
vCPU thread owns one, driven from its own uvloop loop (``SyncPageConnection``), so a demand
fetch never waits behind the background stream or another vCPU.
"""
from __future__ import annotations

import asyncio
import collections
import ssl

import aiohttp
import uvloop

from proto import ErrorReply, MigrationHeader, PageBatch, PageRequest, ProtoError, decode_any

MSGPACK = "application/x-msgpack"
MAX_WS_MESSAGE = 8 << 20
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


def decode_batch(data: bytes, request: PageRequest) -> PageBatch:
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
            self._ws = await self._session.ws_connect(f"{self.base_url}/v1/pages/ws", headers=auth_headers(self.token),
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
    """A PageConnection on an event loop of its own, for a vCPU thread that blocks in KVM_RUN
    between faults: each fetch runs the loop just long enough to get its answer."""

    def __init__(self, base_url: str, token: str, *, ssl_context: ssl.SSLContext | None = None,
                 receive_timeout: float | None = None) -> None:
        self.loop = uvloop.new_event_loop()
        self.conn = PageConnection(base_url, token, ssl_context=ssl_context, receive_timeout=receive_timeout)
        try:
            self.loop.run_until_complete(self.conn.connect())
        except BaseException:
            self.loop.close()
            raise

    def fetch(self, gpa: int, count: int, kind: str) -> PageBatch:
        return self.loop.run_until_complete(self.conn.fetch(gpa, count, kind))

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.conn.close())
        finally:
            self.loop.close()


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
