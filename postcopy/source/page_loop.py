"""The page socket's serving loops, apart from the event loop: frames parsed out of a buffer
and answered (``_Frames``), and the blocking loop of a plain TCP socket (``_BlockingLoop``) as
a thread of the page server runs it (page_socket.ThreadedPageSocket) or a page worker does
(``WorkerLoop``, page_workers.py). Nothing here imports asyncio: a page worker's fork server
starts with only what serving needs (~0.1 s sooner on a busy source).
"""
from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from postcopy import wsframe
from postcopy.busypoll import recv_into_polling
from postcopy.fastframes import DEMAND_FRAME_BYTES, ONE_PAGE_FRAME_BYTES, ONE_PAGE_FRAME_HEAD, demand_gpa

if TYPE_CHECKING:
    from postcopy.source.answers import Board, PageAnswerer

__all__ = ["MAX_CLIENT_HEAD", "WorkerLoop"]

log = logging.getLogger("postcopy.source.page_socket")

# (payload) -> (answer parts, close the socket after them)
Answerer = Callable[[bytes], tuple[Sequence[bytes | memoryview], bool]]
# (gpa of a one-page demand request) -> (batch head, page), or None: answer it as any frame
OnePage = Callable[[int], tuple[bytes, memoryview] | None]
# The longest client frame head: 2 bytes, a 64-bit length, the 4-byte mask key.
MAX_CLIENT_HEAD: Final = 14
# A small client frame: 2 bytes (FIN + binary opcode; mask bit + a length under 126), the key.
SMALL_HEAD: Final = 2 + wsframe.MASK_BYTES
BINARY_FIN: Final = wsframe.FIN | wsframe.OP_BINARY
MASKED_SMALL: Final = wsframe.MASKED
LENGTH_16: Final = 126  # a length byte of 126 or 127 announces a longer length field



class _Frames:
    """Parsing client frames out of a buffer and answering each: shared by every socket.
    ``_send(parts, close_after)`` and ``close(code, reason)`` are the socket's own."""

    _answer: Answerer
    _on_text: Answerer
    _answer_page: OnePage
    _max_frame: int
    _closing: bool
    _write_paused: bool

    def _set_up(self, answerer: PageAnswerer, max_frame: int) -> None:
        """What every socket keeps of what it answers."""
        self._answer = answerer.answer
        self._on_text = answerer.answer_text
        self._answer_page = answerer.answer_page
        self._max_frame = max_frame
        self._closing = False
        # An event-loop socket whose transport buffers more than its high-water mark answers no
        # more frames until it drains (page_socket.PageSocket); a blocking one never sets it.
        self._write_paused = False

    def _demand_answer(self, frame: bytes | bytearray) -> list[bytes | memoryview] | None:
        """The whole answer (frame head included) to frame[:DEMAND_FRAME_BYTES] if it is a
        one-page demand request that ``_answer_page`` answers; else None (the general path)."""
        gpa = demand_gpa(frame)
        parts = self._answer_page(gpa) if gpa >= 0 else None
        if parts is None:
            return None
        return [ONE_PAGE_FRAME_HEAD, *parts]

    def _frames(self, buf: bytes | bytearray, start: int, end: int) -> int:
        """Answer every whole frame in buf[start:end]; returns where the unparsed rest begins
        (the rest of the frames too, once writing is paused)."""
        while start < end and not self._closing and not self._write_paused:
            # The usual frame, a request: final, binary, masked, under 126 bytes. Taken here
            # without the general parser; anything else (or a part of this) goes below.
            if end - start > SMALL_HEAD and buf[start] == BINARY_FIN and buf[start + 1] & MASKED_SMALL == MASKED_SMALL:
                first = start + SMALL_HEAD
                last = first + (buf[start + 1] & wsframe.LENGTH_MASK)
                if last <= end and last - first < LENGTH_16:
                    key = buf[start + 2:first]
                    start = last
                    self._send(*self._answer(wsframe.mask(buf[first:last], key)))
                    continue
            try:
                frame = wsframe.parse(buf, start, end, masked=True, max_payload=self._max_frame)
            except wsframe.FrameError as error:
                self.close(error.code, str(error))
                break
            if frame is None:
                break
            opcode, first, last, key = frame
            start = last
            payload = wsframe.mask(buf[first:last], key)
            if opcode == wsframe.OP_BINARY:
                self._send(*self._answer(payload))
            elif opcode == wsframe.OP_TEXT:
                self._send(*self._on_text(payload))
            elif opcode == wsframe.OP_PING:
                self._send((payload,), False, wsframe.OP_PONG)
            elif opcode == wsframe.OP_CLOSE:
                code = wsframe.U16.unpack(payload[:2])[0] if len(payload) >= 2 else wsframe.CLOSE_NORMAL
                self.close(code if code in (wsframe.CLOSE_NORMAL, wsframe.CLOSE_GOING_AWAY) else wsframe.CLOSE_NORMAL)
            elif opcode != wsframe.OP_PONG:
                self.close(wsframe.CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        return start

    def _send(self, parts: Sequence[bytes | memoryview], close_after: bool,
              opcode: int = wsframe.OP_BINARY) -> None:
        raise NotImplementedError

    def close(self, code: int, reason: str = "") -> None:
        raise NotImplementedError


class _BlockingLoop(_Frames):
    """The serving loop of a plain TCP page socket over a blocking socket of its own
    (``_sock``): where it runs (a thread, a page worker) is the subclass's."""

    _sock: socket.socket
    _buf: bytearray
    _fd_lock: threading.RLock

    def _set_up_loop(self, sock: socket.socket, answerer: PageAnswerer, max_frame: int, poll_ns: int = 0) -> None:
        self._set_up(answerer, max_frame)
        self._poll_ns = poll_ns  # how long to poll for the next request before blocking (busypoll.py)
        self._sock = sock
        self._sock.setblocking(True)
        self._fd_lock = threading.RLock()
        self._buf = bytearray(max_frame + MAX_CLIENT_HEAD)
        self._serving: threading.Thread | None = None  # the thread running _run, once it runs

    def _run(self) -> None:
        self._serving = threading.current_thread()
        sock, buf = self._sock, self._buf
        view = memoryview(buf)
        sendmsg = sock.sendmsg
        poll_ns = self._poll_ns
        start = end = 0
        try:
            while not self._closing:
                n = recv_into_polling(sock, view[end:], poll_ns) if poll_ns else sock.recv_into(view[end:])
                if not n:
                    break
                # The fault path: one whole demand request and nothing else, answered with no
                # parser. Anything else (or None from answer_page) goes below.
                if n == DEMAND_FRAME_BYTES and not end:
                    message = self._demand_answer(buf)
                    if message is not None:
                        sent = sendmsg(message)
                        if sent != ONE_PAGE_FRAME_BYTES:  # cut short (a signal)
                            self._send_rest(message, sent)
                        continue
                end += n
                start = self._frames(buf, start, end)
                if start == end:
                    start = end = 0
                elif start:  # a partial frame: move it to the front (it fits: max_frame + head)
                    view[:end - start] = view[start:end]
                    start, end = 0, end - start
            request = self._close_requested()
            if request is not None and not self._closing:
                self._closing = True
                self._send_close(*request)
        except OSError as error:  # the peer went, or abort() shut the connection down
            log.debug("page socket ended: %s", error)
        except Exception:
            log.exception("page socket loop failed")
        finally:
            self._closing = True
            with self._fd_lock:
                self._shutdown(socket.SHUT_RDWR)
                sock.close()
            self._finished()

    def _close_requested(self) -> tuple[int, str] | None:
        raise NotImplementedError

    def _finished(self) -> None:
        """The loop is done with the connection and guest RAM."""

    def _send(self, parts: Sequence[bytes | memoryview], close_after: bool,
              opcode: int = wsframe.OP_BINARY) -> None:
        length = 0
        for part in parts:
            length += len(part)
        head = wsframe.header(opcode, length, masked=False)
        message = [head, *parts]
        sent = self._sock.sendmsg(message)
        if sent != len(head) + length:  # cut short (a signal): the rest, from where it stopped
            self._send_rest(message, sent)
        if close_after:
            self.close(wsframe.CLOSE_NORMAL)

    def _send_rest(self, message: list[bytes | memoryview], sent: int) -> None:
        for part in message:
            view = memoryview(part).cast("B")
            if sent >= view.nbytes:
                sent -= view.nbytes
                continue
            self._sock.sendall(view[sent:])
            sent = 0

    def _send_close(self, code: int, reason: str) -> None:
        payload = wsframe.close_payload(code, reason)
        try:
            self._sock.sendall(wsframe.header(wsframe.OP_CLOSE, len(payload), masked=False) + payload)
        except OSError:
            pass

    def close(self, code: int, reason: str = "") -> None:
        """Inside the loop (a frame it answered asks for it): send a close frame, then stop."""
        if not self._closing:
            self._closing = True
            self._send_close(code, reason)

    def _shutdown(self, how: int) -> None:
        with self._fd_lock:  # never a shutdown of a descriptor number the loop just closed
            try:
                self._sock.shutdown(how)
            except OSError:  # closed by its loop already
                pass


class WorkerLoop(_BlockingLoop):
    """The serving loop in a page worker (page_workers.py): the connection's descriptor
    passed to it, its close requests left on the board by the page server. It polls for the
    next request for ``poll_ns`` after each answer (a worker has a GIL and, on a source whose
    guest is paused, a CPU to itself; a page server's threads poll not: they share its GIL)."""

    def __init__(self, fd: int, answerer: PageAnswerer, board: Board, slot: int, *, max_frame: int,
                 poll_ns: int = 0) -> None:
        self._set_up_loop(socket.socket(fileno=fd), answerer, max_frame, poll_ns)
        self._board, self._slot = board, slot

    def _close_requested(self) -> tuple[int, str] | None:
        return self._board.close_requested(self._slot)

    def run(self) -> None:
        self._run()
