"""A blocking WebSocket client (RFC 6455) over one TCP socket: the vCPU fault path's transport.

A vCPU thread sends one small request and waits for one answer; an event loop per fetch costs
more than the network (docs/performance.md). This speaks the protocol itself: an HTTP/1.1
upgrade handshake, then masked binary frames out (a client must mask: a 4-byte XOR over a
~25-byte request) and unmasked frames in, read into one reused buffer. Pings are answered;
a close frame, a text frame or a protocol violation is an error.
"""
from __future__ import annotations

import base64
import ctypes
import hashlib
import mmap
import os
import socket
import ssl
import struct
from typing import Final
from urllib.parse import urlsplit

from postcopy import wsframe
from postcopy.busypoll import recv_into_polling

__all__ = ["WebSocketError", "HandshakeError", "BlockingWebSocket"]

WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE_BYTES: Final = 64 * 1024
MAX_ERROR_BODY_BYTES: Final = 64 * 1024
# The longest frame head: 2 bytes, a 64-bit length (server frames carry no mask key).
MAX_FRAME_HEAD: Final = 10
MASK_KEY_POOL: Final = 4096  # bytes of mask keys drawn at once
TIMEVAL: Final = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO / SO_SNDTIMEO


class WebSocketError(Exception):
    """The socket broke, was closed, or the peer broke the protocol; the message says which."""


class HandshakeError(WebSocketError):
    """The server did not upgrade: ``status`` is its HTTP status (0 if none), ``body`` its body."""

    def __init__(self, message: str, status: int = 0, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class BlockingWebSocket:
    """One WebSocket, used by one thread: ``send(payload)`` a binary frame, ``recv()`` the next
    binary message as a memoryview into a buffer reused by the next ``recv``. ``timeout``
    bounds the connect and handshake, ``receive_timeout`` (None: none) each later read."""

    def __init__(self, url: str, headers: dict[str, str], *, max_message: int,
                 ssl_context: ssl.SSLContext | None = None, timeout: float | None = 10.0,
                 receive_timeout: float | None = None, poll_ns: int = 0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss", "http", "https"):
            raise WebSocketError(f"cannot open a WebSocket to {url!r}: scheme {parts.scheme!r}")
        secure = parts.scheme in ("wss", "https")
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        self.url = url
        self.max_message = max_message
        # Room for one maximal frame header too; replies are read straight into it. An anonymous
        # mapping, not a bytearray, which writes its zeros: each connection's 8 MiB would be
        # resident however little it receives (a vCPU's: one-page answers), ~30 of the 117 MiB
        # a 2-vCPU destination held beside its guest's pages.
        self._buf = mmap.mmap(-1, max_message + 16, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.buffer = self._buf  # the receive buffer that recv_known's offsets index
        self._view = memoryview(self._buf)
        # Where the buffer lies: recv_known's caller installs pages from it by address (the
        # buffer is never resized, so the address holds while this socket lives).
        self.buffer_address = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        self._start = self._end = 0
        self._receive_timeout = receive_timeout
        self.poll_ns = 0  # set after the handshake (a plain socket only): busypoll.recv_into_polling
        self._keys, self._key_at = b"", MASK_KEY_POOL
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if secure or ssl_context is not None:
                context = ssl_context or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=host)
        except (OSError, ssl.SSLError) as e:
            raise WebSocketError(f"cannot connect to {host}:{port}: {e}") from None
        self.sock: socket.socket | None = sock
        try:
            self._handshake(host, port, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), headers)
            # After the handshake an answer may take as long as the source takes (None), or at
            # most receive_timeout: then recv fails, a WebSocketError here.
            self._set_receive_timeout(sock, receive_timeout)
            # A TLS socket's reads take no flags (and the SSL layer would hide what is waiting).
            self.poll_ns = 0 if isinstance(sock, ssl.SSLSocket) else max(0, poll_ns)
        except BaseException:
            self._drop()
            raise

    def _set_receive_timeout(self, sock: socket.socket, receive_timeout: float | None) -> None:
        """A plain socket stays in blocking mode and the kernel enforces the timeout
        (SO_RCVTIMEO, SO_SNDTIMEO): one system call per recv or send. Python's own socket
        timeout would poll() before each of them. A TLS socket keeps Python's timeout."""
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(receive_timeout)
            return
        sock.settimeout(None)
        if receive_timeout is not None:
            seconds = int(receive_timeout)
            timeval = TIMEVAL.pack(seconds, max(1, int((receive_timeout - seconds) * 1e6)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._receive_timeout = receive_timeout

    # -- handshake -----------------------------------------------------------------------------
    def _handshake(self, host: str, port: int, path: str, headers: dict[str, str]) -> None:
        key = base64.b64encode(os.urandom(16))
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self._sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head_end = self._fill_until(b"\r\n\r\n", MAX_HANDSHAKE_BYTES)
        head = bytes(self._view[self._start:head_end]).decode("latin-1")
        self._start = head_end + 4
        status_line, *fields = head.split("\r\n")
        try:
            status = int(status_line.split(" ", 2)[1])
        except (IndexError, ValueError):
            raise WebSocketError(f"{self.url}: not an HTTP answer: {status_line[:100]!r}") from None
        answer = {}
        for line in fields:
            name, _, value = line.partition(":")
            answer[name.strip().lower()] = value.strip()
        if status != 101:
            body = self._error_body(answer)
            raise HandshakeError(f"{self.url}: HTTP {status} instead of a WebSocket upgrade", status, body)
        expected = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        if answer.get("upgrade", "").lower() != "websocket" or answer.get("sec-websocket-accept") != expected:
            raise WebSocketError(f"{self.url}: 101 without a valid WebSocket accept")

    def _error_body(self, answer: dict[str, str]) -> bytes:
        """The body of a refused upgrade (Content-Length bounded), for the caller's message."""
        try:
            length = min(int(answer.get("content-length", "0")), MAX_ERROR_BODY_BYTES)
            self._fill(length)
        except (ValueError, WebSocketError):
            return bytes(self._view[self._start:self._end])
        return bytes(self._view[self._start:self._start + length])

    # -- frames --------------------------------------------------------------------------------
    def send(self, payload: bytes, opcode: int = wsframe.OP_BINARY) -> None:
        key = self.mask_key()
        n = len(payload)
        head = bytes((wsframe.FIN | opcode, wsframe.MASKED | n)) if n < 126 else wsframe.header(opcode, n, masked=True)
        self._sendall(head + key + wsframe.mask(payload, key))

    def mask_key(self) -> bytes:
        """The next frame's mask key, fresh and unpredictable (RFC 6455 5.3), drawn from a pool
        of os.urandom bytes: one getrandom call per MASK_KEY_POOL // 4 frames, not per frame."""
        at = self._key_at
        if at == MASK_KEY_POOL:
            self._keys, at = os.urandom(MASK_KEY_POOL), 0
        self._key_at = at + wsframe.MASK_BYTES
        return self._keys[at:at + wsframe.MASK_BYTES]

    def send_frame(self, frame: bytes) -> None:
        """A whole frame built by the caller (masked with mask_key(): fastframes.demand_frame)."""
        self._sendall(frame)

    def recv(self) -> memoryview:
        """The next binary message. Pings are answered on the way; anything else is an error."""
        while True:
            opcode, payload = self._frame()
            if opcode == wsframe.OP_BINARY:
                return payload
            if opcode == wsframe.OP_PING:
                self.send(bytes(payload), wsframe.OP_PONG)
            elif opcode == wsframe.OP_CLOSE:
                code = wsframe.U16.unpack(payload[:2])[0] if len(payload) >= 2 else 1005
                reason = bytes(payload[2:]).decode("utf-8", "replace")
                self._drop()
                raise WebSocketError(f"the server closed the socket (code {code}{': ' + reason if reason else ''})")
            elif opcode == wsframe.OP_TEXT:
                raise WebSocketError("the server sent a text frame; page answers are binary")
            elif opcode != wsframe.OP_PONG:
                raise WebSocketError(f"the server sent a frame with opcode {opcode:#x}")


    def exchange_known(self, frame: bytes, head: bytes, total: int) -> int:
        """The fault path's round trip: send_frame(frame), then recv_known(head, total), with
        the usual case (nothing buffered, no polling, the answer whole in one recv) taken in
        this frame: at 2 vCPUs each Python call is more time under the GIL that the other vCPU
        thread waits for (docs/perf/journal.md, fetch). Anything else goes on the general way."""
        sock = self.sock
        if sock is None or self._start != self._end or self.poll_ns:
            self.send_frame(frame)
            return self.recv_known(head, total)
        try:
            sock.sendall(frame)
        except (OSError, ssl.SSLError) as e:
            raise self._broken(e, sending=True) from None
        try:
            n = sock.recv_into(self._view)
        except (OSError, ssl.SSLError) as e:
            raise self._broken(e, sending=False) from None
        if not n:
            raise self._broken(None, sending=False)
        self._start, self._end = 0, n
        if n >= total and self._buf.find(head, 0, len(head)) == 0 and total - len(head) <= self.max_message:
            self._start = total
            return len(head)
        return self.recv_known(head, total)  # a part of it, or another frame first

    def raw_reader(self) -> tuple[int, int, int, int, mmap.mmap] | None:
        """(fd, receive buffer address, its length, poll_ns, the buffer) for a reader that takes the answer
        to its own request straight from the socket into the buffer's front (the private fault
        loop, which cannot call this object): only where nothing is buffered and the socket is
        plain (TLS keeps its state in this interpreter). ``raw_read`` then says what it got."""
        sock = self.sock
        if sock is None or isinstance(sock, ssl.SSLSocket) or self._start != self._end:
            return None
        return sock.fileno(), self.buffer_address, len(self._buf), self.poll_ns, self._buf

    def raw_read(self, received: int, error: int) -> None:
        """What such a reader left: ``received`` bytes at the buffer's front, for recv_known or
        recv to go on from; or ``error``, the errno that broke its send or recv (-1: the server
        closed the connection), raised as a WebSocketError as this object's own reads do."""
        if error:
            raise self._broken(None if error < 0 else OSError(error, os.strerror(error)), sending=False)
        self._start, self._end = 0, received

    def recv_known(self, head: bytes, total: int) -> int:
        """The fault path's receive, for an answer whose frame head is known: when the next
        frame starts with ``head`` (which fixes its length, ``total`` bytes with the head), read
        all of it and return where its payload starts in ``buffer`` (valid until the next
        receive). Else -1, and the frame stays for recv(), which reads any frame."""
        if self._start == self._end:  # nothing buffered (the usual): read from the front
            self._start = self._end = 0
        self._fill(len(head))
        start = self._start
        if self._buf.find(head, start, start + len(head)) != start or total - len(head) > self.max_message:
            return -1  # (a frame over max_message: recv() refuses it with its error)
        self._fill(total)
        start = self._start  # _fill may have moved the unread bytes to the front
        self._start = start + total
        return start + len(head)

    def _frame(self) -> tuple[int, memoryview]:
        """One whole frame, read into the buffer (a frame's head, then as much as it needs)."""
        while True:
            need = 2
            if self._end > self._start:  # something is buffered: maybe a whole frame
                try:
                    frame = wsframe.parse(self._buf, self._start, self._end, masked=False,
                                          max_payload=self.max_message)
                except wsframe.FrameError as e:
                    self._drop()
                    raise WebSocketError(f"bad frame from the server: {e}") from None
                if frame is not None:
                    opcode, first, end, _ = frame
                    self._start = end
                    return opcode, self._view[first:end]
                need = self._end - self._start + 1
                if need > MAX_FRAME_HEAD:  # the head is known: wait for the whole frame at once
                    need = self._frame_length()
            self._fill(need)

    def _frame_length(self) -> int:
        """Head plus payload length of the frame at the buffer's start (its head is all there)."""
        b1 = self._buf[self._start + 1] & 0x7F
        if b1 < 126:
            return 2 + b1
        if b1 == 126:
            return 4 + wsframe.U16.unpack_from(self._buf, self._start + 2)[0]
        return 10 + int.from_bytes(self._buf[self._start + 2:self._start + 10], "big")

    # -- reading into the one buffer -----------------------------------------------------------
    def _fill(self, need: int) -> None:
        """Until ``need`` unread bytes are in the buffer (moving the unread part to its front)."""
        if self._end - self._start >= need:
            return
        if self._start:
            unread = self._end - self._start
            self._view[:unread] = self._view[self._start:self._end]
            self._start, self._end = 0, unread
        while self._end < need:
            self._end += self._recv_into(self._view[self._end:])

    def _fill_until(self, marker: bytes, limit: int) -> int:
        """The index of ``marker`` in the buffer, reading until it arrives (within ``limit``)."""
        while True:
            at = self._buf.find(marker, self._start, self._end)
            if at >= 0:
                return at
            if self._end - self._start >= limit:
                raise WebSocketError(f"{self.url}: HTTP answer head over {limit} bytes")
            self._end += self._recv_into(self._view[self._end:])

    def _recv_into(self, target: memoryview) -> int:
        sock = self.sock
        if sock is None:
            raise WebSocketError("the socket is closed")
        try:
            # polling: the answer finds this thread on a CPU that never halted (busypoll.py)
            n = recv_into_polling(sock, target, self.poll_ns) if self.poll_ns else sock.recv_into(target)
        except (OSError, ssl.SSLError) as e:
            raise self._broken(e, sending=False) from None
        if not n:
            raise self._broken(None, sending=False)
        return n

    def _broken(self, error: BaseException | None, *, sending: bool) -> WebSocketError:
        """The socket is dropped; what the failed send or recv (``error``; None: the server
        closed the connection) tells the caller."""
        self._drop()
        if error is None:
            return WebSocketError("the server closed the connection")
        if isinstance(error, BlockingIOError):  # SO_SNDTIMEO / SO_RCVTIMEO ran out
            if sending:
                return WebSocketError(f"the socket timed out: the server took no request within {self._receive_timeout} s")
            return WebSocketError(f"the socket timed out: no answer within {self._receive_timeout} s")
        return WebSocketError(f"the socket broke: {error}")

    def _sendall(self, data: bytes) -> None:
        if self.sock is None:
            raise WebSocketError("the socket is closed")
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as e:  # BlockingIOError: SO_SNDTIMEO ran out, the source reads nothing
            raise self._broken(e, sending=True) from None

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Send a close frame (best effort) and close the socket."""
        if self.sock is None:
            return
        try:
            self.send(wsframe.close_payload(wsframe.CLOSE_NORMAL), wsframe.OP_CLOSE)
        except WebSocketError:
            pass
        self._drop()

    def _drop(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                # close() alone does not wake a thread blocked in recv on this socket (Linux):
                # shutdown does, so closing a connection ends whoever waits on it.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
