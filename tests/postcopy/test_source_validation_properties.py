"""Properties of the page server's request validation over generated input: every frame is
either a request inside one memory region or refused with the status the protocol names
(docs/protocol.md, Errors), never anything else."""
from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postcopy.source.answers import decode_error_code as _decode_error_code
from proto import MAX_BATCH_PAGES, PAGE_SIZE, PROTOCOL_VERSION, REQUEST_KINDS, MemoryRegion, PageRequest, ProtoError
from proto.version import MAX_GPA, MAX_REQUEST_MESSAGE_BYTES

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MiB = 1 << 20
REGIONS = (MemoryRegion(0, 16 * PAGE_SIZE), MemoryRegion(MiB, 6 * PAGE_SIZE))


def verdict(frame: bytes) -> int | PageRequest:
    """What the page server does with a binary frame while serving: the request, or the status."""
    try:
        request = PageRequest.decode(frame)
    except ProtoError:
        return _decode_error_code(frame)
    try:
        request.validate_range(REGIONS)
    except ProtoError:
        return 416
    return request


def expected(gpa: int, count: int, kind: str) -> int | None:
    """The protocol's answer for a well-formed map with these fields (None: served)."""
    if count > MAX_BATCH_PAGES:
        return 413
    if count < 1:
        return 400
    if gpa % PAGE_SIZE or not 0 <= gpa <= MAX_GPA - count * PAGE_SIZE:
        return 416
    if kind not in REQUEST_KINDS:
        return 400
    end = gpa + count * PAGE_SIZE
    return None if any(r.gpa <= gpa and end <= r.gpa + r.size for r in REGIONS) else 416


near_regions = st.one_of(st.integers(0, 2 * MiB), st.integers(-(1 << 63), (1 << 64) - 1),
                         st.sampled_from([MAX_GPA, MAX_GPA - PAGE_SIZE, 16 * PAGE_SIZE, MiB + 5 * PAGE_SIZE]))
counts = st.one_of(st.integers(-3, 40), st.integers(MAX_BATCH_PAGES - 2, MAX_BATCH_PAGES + 2), st.integers(-(1 << 63), (1 << 64) - 1))
kinds = st.one_of(st.sampled_from(sorted(REQUEST_KINDS)), st.text(max_size=12))


@FAST
@given(near_regions, counts, kinds)
def test_a_well_formed_request_is_served_exactly_when_it_lies_inside_one_region(gpa: int, count: int, kind: str) -> None:
    frame = msgpack.packb({"v": PROTOCOL_VERSION, "t": "page_request", "gpa": gpa, "count": count, "kind": kind})
    got = verdict(frame)
    want = expected(gpa, count, kind)
    if len(frame) > MAX_REQUEST_MESSAGE_BYTES:
        assert got == 413
    elif want is None:
        assert isinstance(got, PageRequest) and (got.gpa, got.count, got.kind) == (gpa, count, kind)
    else:
        assert got == want, (gpa, count, kind)


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_are_served_or_refused_with_400_413_or_416(frame: bytes) -> None:
    got = verdict(frame)
    assert isinstance(got, PageRequest) or got in (400, 413, 416)


maps = st.dictionaries(st.sampled_from(["v", "t", "gpa", "count", "kind", "x"]),
                       st.one_of(st.integers(-5, 1 << 53), st.text(max_size=12), st.none(), st.booleans(),
                                 st.floats(allow_nan=False), st.binary(max_size=8)), max_size=6)


@FAST
@given(maps)
def test_any_map_is_served_or_refused_and_a_served_one_is_inside_a_region(fields: dict[str, object]) -> None:
    got = verdict(msgpack.packb(fields))
    if isinstance(got, PageRequest):
        end = got.gpa + got.count * PAGE_SIZE
        assert any(r.gpa <= got.gpa and end <= r.gpa + r.size for r in REGIONS)
    else:
        assert got in (400, 413, 416)
