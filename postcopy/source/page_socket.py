"""The page socket's fast paths: after aiohttp has authenticated the request and answered the
WebSocket upgrade, the connection is taken away from aiohttp and every request frame is
answered here, the guest's pages going out as views of its RAM (no copy).

- ``ThreadedPageSocket`` (plain TCP): a thread of its own per socket, blocking ``recv_into``
  a reused buffer and one ``sendmsg`` of frame header + answer parts: two system calls per
  request and no event loop between them, as lean as a raw-socket peer. On this host the event
  loop's callback (epoll wake-up, read, writev, the loop's own work) roughly doubled a one-page
  fetch's round trip against a raw-socket ping-pong (docs/performance.md).
- ``WorkerPageSocket`` (plain TCP, where the page server has page workers): the same loop
  (``WorkerLoop``) in a page worker, a process of its own per socket (page_workers.py), so
  that each socket has a GIL of its own. With a thread each, the sockets of a destination's
  vCPUs took turns on one GIL, and a thread that found it held slept until it was woken across
  CPUs: a fifth of the 2-vCPU fault's p99 (docs/perf/journal.md, fetch).
- ``PageSocket`` (TLS, whose bytes only the event loop's SSL transport can read): the same
  answers from inside ``data_received``, one ``writelines`` each.

What a socket answers and counts is decided by its answers.PageAnswerer; this module only frames
it (RFC 6455, via postcopy.wsframe). The fault path's request, a one-page demand request in the
fixed layout (proto/fastpath.py), is recognised in its masked frame by fastframes.demand_gpa and
answered by the answerer's answer_page: no frame parser, no general decode. Every socket offers
the PageServer the same things: ``closed`` (a future of its loop, done when the connection is
gone and nothing of guest RAM is referenced any more), ``close(code, reason)`` and ``abort()``.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from postcopy import wsframe
from postcopy.fastframes import DEMAND_FRAME_BYTES
from postcopy.source.page_loop import _BlockingLoop, _Frames

if TYPE_CHECKING:
    from postcopy.source.answers import Board, PageAnswerer

# The serving loops (and their frame parsing) are page_loop.py's, without asyncio.

class ServedSocket(Protocol):
    """What the page server keeps of each page socket, whichever kind."""

    closed: asyncio.Future[None]

    def close(self, code: int, reason: str = "") -> None: ...

    def abort(self) -> None: ...


class ThreadedPageSocket(_BlockingLoop):
    """One destination's page socket (plain TCP), served by a thread of the page server.

    The thread owns a duplicate of the connection's descriptor, made blocking; the event loop's
    transport stays open (reading paused) until the thread ends, then is aborted on the loop.
    ``close`` asks the thread to send a close frame and stop (shutdown(SHUT_RD) wakes its recv);
    ``abort`` shuts the connection down both ways, which also ends a ``sendmsg`` blocked on a
    peer that reads nothing (whose buffered answers are views of guest RAM)."""

    def __init__(self, transport: asyncio.Transport, answerer: PageAnswerer, *, max_frame: int) -> None:
        raw = transport.get_extra_info("socket")
        self.transport = transport
        self._close_request: tuple[int, str] | None = None
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        transport.pause_reading()  # from here on only the thread reads this connection
        self._set_up_loop(socket.socket(fileno=os.dup(raw.fileno())), answerer, max_frame)
        self._thread = threading.Thread(target=self._run, name=f"page-socket-{self._sock.fileno()}", daemon=True)

    @classmethod
    def take_over(cls, transport: asyncio.Transport, answerer: PageAnswerer, *, max_frame: int) -> ThreadedPageSocket:
        socket_ = cls(transport, answerer, max_frame=max_frame)
        socket_._thread.start()
        return socket_

    def _finished(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._ended)
        except RuntimeError:  # the loop is closed already: nobody waits for this socket
            pass

    def _ended(self) -> None:
        """On the loop, once the thread is done with the connection (and guest RAM)."""
        self.transport.abort()
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame and close the connection (the client need not answer)."""
        if threading.current_thread() is self._serving:
            super().close(code, reason)
        elif self._close_request is None and not self._closing:
            self._close_request = (code, reason)
            self._shutdown(socket.SHUT_RD)  # the thread's recv returns 0: it sends the frame

    def _close_requested(self) -> tuple[int, str] | None:
        return self._close_request

    def abort(self) -> None:
        """Drop the connection at once, whatever the thread was doing with it."""
        self._shutdown(socket.SHUT_RDWR)


class WorkerPageSocket:
    """One destination's page socket (plain TCP) as the page server sees it while a page worker
    serves it (page_workers.py): the event loop's transport (reading paused, kept until the
    worker has ended, then aborted), a duplicate of the descriptor to shut the connection down
    with, and the worker's pidfd, readable once it has exited. ``close`` leaves the request on
    the board and wakes the worker's recv (shutdown(SHUT_RD)), as a thread's; ``abort`` shuts the
    connection down both ways and kills the worker."""

    def __init__(self, transport: asyncio.Transport, board: Board, slot: int) -> None:
        raw = transport.get_extra_info("socket")
        self.transport = transport
        self._board, self._slot = board, slot
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.started: asyncio.Future[bool] = self._loop.create_future()  # True: a worker serves it
        transport.pause_reading()  # from here on only the worker reads this connection
        self.sock = socket.socket(fileno=os.dup(raw.fileno()))
        self.pidfd = -1
        self._close_asked = False

    def served_by(self, pidfd: int) -> None:
        """The worker is running (its pidfd is ours): its exit ends the socket."""
        self.pidfd = pidfd
        self._loop.add_reader(pidfd, self._ended)
        if not self.started.done():
            self.started.set_result(True)

    def _ended(self) -> None:
        """On the loop, once the worker has exited (it let go of the connection and guest RAM)."""
        if self.pidfd >= 0:
            self._loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        self._shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.transport.abort()
        if not self.closed.done():
            self.closed.set_result(None)

    def release(self) -> None:
        """No worker serves it: give the connection back, untouched (reading resumed)."""
        self.sock.close()
        self.transport.resume_reading()
        if not self.closed.done():
            self.closed.set_result(None)

    def not_served(self) -> None:
        """No worker took the connection (the fork server failed): the caller serves it."""
        if not self.started.done():
            self.started.set_result(False)

    def _shutdown(self, how: int) -> None:
        try:
            self.sock.shutdown(how)
        except OSError:  # gone already
            pass

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame and close the connection (the client need not answer)."""
        if self._close_asked or self.closed.done():
            return
        self._close_asked = True
        self._board.request_close(self._slot, code, reason)
        self._shutdown(socket.SHUT_RD)  # the worker's recv returns 0: it sends the frame

    def abort(self) -> None:
        """Drop the connection at once and end the worker, whatever it was doing."""
        if self.closed.done():
            return
        self._shutdown(socket.SHUT_RDWR)
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:  # exited already; _ended follows
                pass


class PageSocket(asyncio.Protocol, _Frames):
    """One destination's page socket, served from the event loop's read callback (TLS)."""

    def __init__(self, transport: asyncio.Transport, answerer: PageAnswerer, *, max_frame: int,
                 previous: asyncio.BaseProtocol | None = None) -> None:
        self.transport = transport
        self._set_up(answerer, max_frame)
        self._previous = previous  # aiohttp's protocol: told when the connection is lost
        self._buf = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    def take_over(cls, transport: asyncio.Transport, answerer: PageAnswerer, *, max_frame: int) -> PageSocket:
        previous = transport.get_protocol()
        socket_ = cls(transport, answerer, max_frame=max_frame, previous=previous)
        transport.set_protocol(socket_)
        return socket_

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            start = self._frames(buf, 0, len(buf))
            del buf[:start]
        else:  # the usual case: one whole request in one read, no copy
            if len(data) == DEMAND_FRAME_BYTES and not self._write_paused:
                message = self._demand_answer(data)
                if message is not None:
                    self.transport.writelines(message)
                    return
            start = self._frames(data, 0, len(data))
            if start < len(data):
                buf += data[start:]

    def _send(self, parts: Sequence[bytes | memoryview], close_after: bool,
              opcode: int = wsframe.OP_BINARY) -> None:
        length = sum(len(p) for p in parts)
        self.transport.writelines([wsframe.header(opcode, length, masked=False), *parts])
        if close_after:
            self.close(wsframe.CLOSE_NORMAL)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._previous is not None:
            self._previous.connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    # Flow control: a client that sends requests without reading the answers stops being
    # answered, then read. Not reading alone is not enough: one read over TLS can hold thousands
    # of requests, each answered with up to 4 MiB that the transport would buffer, encrypted.
    def pause_writing(self) -> None:
        self._write_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        buf = self._buf
        if buf:  # the frames held back, answered until the transport is full again
            del buf[:self._frames(buf, 0, len(buf))]
        if not self._write_paused and not self._closing:
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
