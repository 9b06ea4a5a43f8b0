"""WebSocket framing (RFC 6455 section 5), shared by the page server's fast path and the
destination's blocking client: frame headers, masking, and parsing one frame from a buffer."""
from __future__ import annotations

import mmap
import struct
from typing import Final

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
FIN: Final = 0x80
MASKED: Final = 0x80
LENGTH_MASK: Final = 0x7F  # the second byte's length bits
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_MESSAGE_TOO_BIG: Final = 1009
MASK_BYTES: Final = 4
_LEN16, _LEN64, U16 = struct.Struct(">H"), struct.Struct(">Q"), struct.Struct(">H")


class FrameError(Exception):
    """A frame breaks RFC 6455 (or this protocol's use of it); ``code`` is the close code."""

    def __init__(self, message: str, code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


def header(opcode: int, length: int, *, masked: bool) -> bytes:
    """The header of a final (unfragmented) frame; a masked frame's key follows it."""
    bit = MASKED if masked else 0
    if length < 126:
        return bytes((FIN | opcode, bit | length))
    if length < 1 << 16:
        return bytes((FIN | opcode, bit | 126)) + _LEN16.pack(length)
    return bytes((FIN | opcode, bit | 127)) + _LEN64.pack(length)


def mask(payload: bytes | memoryview, key: bytes) -> bytes:
    """payload XOR the repeated 4-byte key (masking and unmasking are the same), as one big-int
    XOR: no per-byte Python loop, cheap for the ~25-byte requests of the fault path."""
    n = len(payload)
    keys = (key * (n // MASK_BYTES + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keys, "little")).to_bytes(n, "little")


def close_payload(code: int, reason: str = "") -> bytes:
    return U16.pack(code) + reason.encode()[:120]


def parse(buf: bytes | bytearray | memoryview | mmap.mmap, start: int, end: int, *,
          masked: bool, max_payload: int) -> tuple[int, int, int, bytes] | None:
    """The frame at buf[start:end]: (opcode, payload start, payload end, mask key or b""), or
    None if it is not all there yet. FrameError for a fragment, a wrong mask bit, or a payload
    over ``max_payload`` (its length is checked before it is waited for)."""
    if end - start < 2:
        return None
    b0, b1 = buf[start], buf[start + 1]
    if not b0 & FIN or (b0 & 0x0F) == OP_CONTINUATION:
        raise FrameError("fragmented messages are not used by this protocol")
    if bool(b1 & MASKED) != masked:
        raise FrameError("a client frame must be masked and a server frame must not be (RFC 6455 5.1)")
    n, at = b1 & 0x7F, start + 2
    if n == 126:
        if end - at < 2:
            return None
        n, at = _LEN16.unpack_from(buf, at)[0], at + 2
    elif n == 127:
        if end - at < 8:
            return None
        n, at = _LEN64.unpack_from(buf, at)[0], at + 8
    if n > max_payload:
        raise FrameError(f"a frame of {n} bytes is over the {max_payload} allowed", CLOSE_MESSAGE_TOO_BIG)
    key = b""
    if masked:
        if end - at < MASK_BYTES:
            return None
        key, at = bytes(buf[at:at + MASK_BYTES]), at + MASK_BYTES
    if end - at < n:
        return None
    return b0 & 0x0F, at, at + n, key
