"""The page socket's fast path: after aiohttp has authenticated the request and answered the
WebSocket upgrade, this protocol takes the connection's transport over and answers every
request frame from inside ``data_received``, with one ``writelines`` of the answer's parts
(the guest's pages go out as views of its RAM, not copies).

Why: through aiohttp's WebSocketResponse a request costs a reader queue, a future, a task step
and a writer per frame; on this host that doubled a one-page fetch's round trip
(docs/performance.md). What the socket answers is decided by PageServer.answer(); this module
only frames it (RFC 6455, via postcopy.wsframe).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from postcopy import wsframe

log = logging.getLogger("postcopy.source.page_socket")

# (payload) -> (answer parts, close the socket after them)
Answerer = Callable[[bytes], tuple[Sequence[bytes | memoryview], bool]]


class PageSocket(asyncio.Protocol):
    """One destination's page socket, served from the event loop's read callback."""

    def __init__(self, transport: asyncio.Transport, answer: Answerer, on_text: Answerer, *,
                 max_frame: int, previous: asyncio.BaseProtocol | None = None) -> None:
        self.transport = transport
        self._answer = answer
        self._on_text = on_text
        self._max_frame = max_frame
        self._previous = previous  # aiohttp's protocol: told when the connection is lost
        self._buf = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closing = False

    @classmethod
    def take_over(cls, transport: asyncio.Transport, answer: Answerer, on_text: Answerer, *,
                  max_frame: int) -> PageSocket:
        previous = transport.get_protocol()
        socket = cls(transport, answer, on_text, max_frame=max_frame, previous=previous)
        transport.set_protocol(socket)
        return socket

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data  # the usual case: one whole request in one read, no copy
        start, end = 0, len(view)
        while not self._closing:
            try:
                frame = wsframe.parse(view, start, end, masked=True, max_payload=self._max_frame)
            except wsframe.FrameError as error:
                self.close(error.code, str(error))
                return
            if frame is None:
                break
            opcode, first, last, key = frame
            start = last
            payload = wsframe.mask(view[first:last], key)
            self._frame(opcode, payload)
        if view is buf:
            del buf[:start]
        elif start < end:
            buf += data[start:]

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == wsframe.OP_BINARY:
            self._send(*self._answer(payload))
        elif opcode == wsframe.OP_TEXT:
            self._send(*self._on_text(payload))
        elif opcode == wsframe.OP_PING:
            self.transport.write(wsframe.header(wsframe.OP_PONG, len(payload), masked=False) + payload)
        elif opcode == wsframe.OP_CLOSE:
            code = wsframe.U16.unpack(payload[:2])[0] if len(payload) >= 2 else wsframe.CLOSE_NORMAL
            self.close(code if code in (wsframe.CLOSE_NORMAL, wsframe.CLOSE_GOING_AWAY) else wsframe.CLOSE_NORMAL)
        elif opcode != wsframe.OP_PONG:
            self.close(wsframe.CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")

    def _send(self, parts: Sequence[bytes | memoryview], close_after: bool) -> None:
        length = sum(len(p) for p in parts)
        self.transport.writelines([wsframe.header(wsframe.OP_BINARY, length, masked=False), *parts])
        if close_after:
            self.close(wsframe.CLOSE_NORMAL)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._previous is not None:
            self._previous.connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    # Flow control: a client that sends requests without reading the answers stops being read.
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    # -- closing -------------------------------------------------------------------------------
    def abort(self) -> None:
        """Drop the connection and whatever it still buffers (views of guest RAM) at once."""
        self._closing = True
        self.transport.abort()

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame and close the connection (the client need not answer)."""
        if self._closing:
            return
        self._closing = True
        payload = wsframe.close_payload(code, reason)
        if not self.transport.is_closing():
            self.transport.write(wsframe.header(wsframe.OP_CLOSE, len(payload), masked=False) + payload)
            self.transport.close()
