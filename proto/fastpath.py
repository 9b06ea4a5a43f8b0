"""Fixed-layout encodings of the fault path's two messages: a PageRequest, and a PageBatch of
one data page. They are ordinary msgpack (any decoder reads them, and the general decoders of
messages.py accept them), but with every field at a fixed offset (the gpa always as a uint64,
the count as a uint16), so each side builds them with one struct pack and recognises them with
a few byte compares instead of msgpack's general machinery and a record's checks: on this host
that general path was ~10 us of a one-page fetch's Python (docs/performance.md).

Whatever is not byte for byte one of these layouts is left to the general decoders, which give
the clear errors; what is recognised here passes exactly the checks those decoders make.
"""
from __future__ import annotations

import mmap
import struct
from typing import Final

import msgpack
from proto.checksum import Buffer, pages_sum
from proto.messages import PageBatch, PageRequest
from proto.version import MAX_BATCH_PAGES, MAX_GPA, PAGE_SIZE, PROTOCOL_VERSION

__all__ = ["DEMAND_GPA_AT", "DEMAND_REQUEST", "ONE_PAGE_ANSWER_BYTES", "ONE_PAGE_DATA_AT", "encode_request",
           "one_page_head", "one_page_ok", "parse_request", "verified_one_page"]

_pack = msgpack.packb


def _envelope(map_len: int, message_type: str) -> bytes:
    return bytes((0x80 | map_len,)) + _pack("v") + _pack(PROTOCOL_VERSION) + _pack("t") + _pack(message_type)


_U64: Final = b"\xcf"  # msgpack uint 64
_U16: Final = b"\xcd"  # msgpack uint 16

# PageRequest: map(5) v t gpa=<u64> count=<u16> kind=<str>
_REQUEST: Final = struct.Struct(
    f">{len(_envelope(5, PageRequest.TYPE)) + len(_pack('gpa')) + 1}sQ{len(_pack('count')) + 1}sH{len(_pack('kind'))}s")
_REQUEST_HEAD: Final = _envelope(5, PageRequest.TYPE) + _pack("gpa") + _U64
_REQUEST_COUNT: Final = _pack("count") + _U16
_REQUEST_KIND: Final = _pack("kind")
_KIND_BYTES: Final = {kind: _pack(kind) for kind in ("demand", "readahead", "background")}
_KIND_OF: Final = {encoded: kind for kind, encoded in _KIND_BYTES.items()}
assert MAX_BATCH_PAGES < 1 << 16 and _REQUEST.size == len(_REQUEST_HEAD) + 8 + len(_REQUEST_COUNT) + 2 + len(_REQUEST_KIND)


def encode_request(gpa: int, count: int, kind: str) -> bytes:
    """The fixed-layout encoding of PageRequest(gpa, count, kind) (which validated them)."""
    return _REQUEST.pack(_REQUEST_HEAD, gpa, _REQUEST_COUNT, count, _REQUEST_KIND) + _KIND_BYTES[kind]


# The fault path's own request, one page on demand, with its gpa zero; the gpa's 8 bytes
# (big-endian) sit at DEMAND_GPA_AT. The source's socket recognises it by these (page_socket.py).
DEMAND_REQUEST: Final = encode_request(0, 1, "demand")
DEMAND_GPA_AT: Final = len(_REQUEST_HEAD)


def parse_request(payload: Buffer) -> tuple[int, int, str] | None:
    """(gpa, count, kind) of a fixed-layout PageRequest whose fields are valid as
    PageRequest checks them, else None (for the general decoder: other layouts, errors)."""
    if len(payload) <= _REQUEST.size:
        return None
    try:
        head, gpa, count_key, count, kind_key = _REQUEST.unpack_from(payload)
    except struct.error:
        return None
    kind = _KIND_OF.get(bytes(payload[_REQUEST.size:]))
    if (kind is None or head != _REQUEST_HEAD or count_key != _REQUEST_COUNT or kind_key != _REQUEST_KIND
            or not 1 <= count <= MAX_BATCH_PAGES or gpa % PAGE_SIZE or gpa > MAX_GPA - count * PAGE_SIZE):
        return None
    return gpa, count, kind


# A PageBatch of one data page: map(7) v t gpa=<u64> count=1 zero=bin8(1)\0 sum=<u64>
# data=bin16(4096)<page> (data last, as page_batch_parts sends it). Its head is all but the page.
_ANSWER_HEAD: Final = _envelope(7, PageBatch.TYPE) + _pack("gpa") + _U64
_ANSWER_SUM: Final = _pack("count") + _pack(1) + _pack("zero") + _pack(b"\0") + _pack("sum") + _U64
_ANSWER_DATA: Final = _pack("data") + b"\xc5" + PAGE_SIZE.to_bytes(2, "big")
_ANSWER: Final = struct.Struct(f">{len(_ANSWER_HEAD)}sQ{len(_ANSWER_SUM)}sQ{len(_ANSWER_DATA)}s")
ONE_PAGE_ANSWER_BYTES: Final = _ANSWER.size + PAGE_SIZE
ONE_PAGE_DATA_AT: Final = _ANSWER.size  # where the page starts in the answer


def one_page_head(gpa: int, page: Buffer) -> bytes:
    """Everything of the fixed-layout PageBatch for the one data page ``page`` at ``gpa`` but
    the page itself, which follows it (sent as a view of guest RAM)."""
    return _ANSWER.pack(_ANSWER_HEAD, gpa, _ANSWER_SUM, pages_sum(page), _ANSWER_DATA)


def one_page_ok(buf: bytearray | memoryview | mmap.mmap, at: int, request_gpa: int) -> bool:
    """Whether buf[at:at + ONE_PAGE_ANSWER_BYTES] is the fixed-layout one-page answer for
    ``request_gpa`` and its page (from ``at + ONE_PAGE_DATA_AT``) matches its checksum: the
    fault path's check, with no copy and no record (one unpack, then compares: at 2 vCPUs
    this runs under the GIL the other vCPU thread waits for). False: the general decoder says
    what is wrong with it (a bad checksum included)."""
    if len(buf) - at < ONE_PAGE_ANSWER_BYTES:
        return False
    head, gpa, sum_key, checksum, data_key = _UNPACK_ANSWER(buf, at)
    return (gpa == request_gpa and head == _ANSWER_HEAD and sum_key == _ANSWER_SUM and data_key == _ANSWER_DATA
            and pages_sum(memoryview(buf)[at + ONE_PAGE_DATA_AT:at + ONE_PAGE_ANSWER_BYTES]) == checksum)


def verified_one_page(answer: Buffer, request_gpa: int) -> PageBatch | None:
    """The PageBatch in ``answer`` if it is the fixed-layout one-page answer for
    ``request_gpa`` and its page matches its checksum; else None (the general decoder then
    says what is wrong with it, a bad checksum included)."""
    view = memoryview(answer)
    if len(view) != ONE_PAGE_ANSWER_BYTES or not one_page_ok(view, 0, request_gpa):
        return None
    checksum = _U64_AT(view, _SUM_AT)[0]
    data = bytes(view[_ANSWER.size:])
    # Checked above byte for byte: what PageBatch's own checks (and check_answers, verify)
    # would establish, so the record is made without repeating them.
    batch = _new_batch(PageBatch)
    _set(batch, "gpa", request_gpa)
    _set(batch, "count", 1)
    _set(batch, "zero", b"\0")
    _set(batch, "data", data)
    _set(batch, "sum", checksum)
    return batch


_UNPACK_ANSWER: Final = _ANSWER.unpack_from
_SUM_AT: Final = len(_ANSWER_HEAD) + 8 + len(_ANSWER_SUM)
_U64_AT: Final = struct.Struct(">Q").unpack_from
_new_batch: Final = object.__new__
_set: Final = object.__setattr__
