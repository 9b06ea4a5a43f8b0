"""The fault path's two messages in their WebSocket frames (RFC 6455, postcopy.wsframe), as the
page socket's ends recognise them without a frame parser:

- the one-page demand request (proto/fastpath.py's fixed layout), masked as a client frame must
  be: ``demand_frame`` builds it with one big-int XOR, ``demand_gpa`` unmasks it with another
  and compares every byte but the gpa's;
- the one-page answer: its frame head is fixed (ONE_PAGE_FRAME_HEAD), so the client checks one
  prefix and reads a known length.

Anything that is not byte for byte one of these goes to the general parsers, which give the
errors.
"""
from __future__ import annotations

from typing import Final

from postcopy import wsframe
from proto import fastpath

_DEMAND_BYTES: Final = len(fastpath.DEMAND_REQUEST)
_SMALL_HEAD: Final = 2 + wsframe.MASK_BYTES  # FIN + opcode, mask bit + length under 126, key
DEMAND_FRAME_BYTES: Final = _SMALL_HEAD + _DEMAND_BYTES
_B0: Final = wsframe.FIN | wsframe.OP_BINARY
_B1: Final = wsframe.MASKED | _DEMAND_BYTES
_HEAD: Final = bytes((_B0, _B1))
_TEMPLATE: Final = int.from_bytes(fastpath.DEMAND_REQUEST, "big")  # its gpa bits are zero
_GPA_SHIFT: Final = 8 * (_DEMAND_BYTES - fastpath.DEMAND_GPA_AT - 8)
_U64: Final = (1 << 64) - 1
_NOT_GPA: Final = ((1 << 8 * _DEMAND_BYTES) - 1) ^ (_U64 << _GPA_SHIFT)
_KEY_COPIES: Final = _DEMAND_BYTES // wsframe.MASK_BYTES + 1
_KEY_TRIM: Final = 8 * (_KEY_COPIES * wsframe.MASK_BYTES - _DEMAND_BYTES)

ONE_PAGE_FRAME_HEAD: Final = wsframe.header(wsframe.OP_BINARY, fastpath.ONE_PAGE_ANSWER_BYTES, masked=False)
ONE_PAGE_FRAME_BYTES: Final = len(ONE_PAGE_FRAME_HEAD) + fastpath.ONE_PAGE_ANSWER_BYTES

assert _DEMAND_BYTES < 126  # a small frame: its length is in the second byte


def demand_frame(gpa: int, key: bytes) -> bytes:
    """The whole frame of the one-page demand request for ``gpa`` (page aligned, in guest RAM:
    the caller checked), masked with the 4-byte ``key``: encode_request and the frame's masking
    in one XOR, a third of their cost on the fault path."""
    masked = (_TEMPLATE | gpa << _GPA_SHIFT) ^ int.from_bytes(key * _KEY_COPIES, "big") >> _KEY_TRIM
    return _HEAD + key + masked.to_bytes(_DEMAND_BYTES, "big")


def demand_gpa(frame: bytes | bytearray) -> int:
    """The gpa of the one-page demand request whose whole masked frame is
    frame[:DEMAND_FRAME_BYTES], or -1 if it is not one. The gpa itself is not checked here."""
    if frame[0] != _B0 or frame[1] != _B1:
        return -1
    payload = (int.from_bytes(frame[_SMALL_HEAD:DEMAND_FRAME_BYTES], "big")
               ^ int.from_bytes(frame[2:_SMALL_HEAD] * _KEY_COPIES, "big") >> _KEY_TRIM)
    if payload & _NOT_GPA != _TEMPLATE:
        return -1
    return payload >> _GPA_SHIFT & _U64
