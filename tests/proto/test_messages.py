"""Each wire message round-trips, and each validation rule rejects what it should."""

import os
from dataclasses import replace
from typing import Any

import msgpack
from xxhash import xxh3_64_intdigest
import pytest

from proto import (
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    Complete,
    ErrorReply,
    MemoryRegion,
    MigrationHeader,
    PageBatch,
    PageRequest,
    PageRun,
    ProtoError,
    VcpuState,
    VmState,
    build_page_batch,
    decode_any,
    pages_sum,
    ZeroMap,
)
from proto.version import MAX_BATCH_MESSAGE_BYTES, MAX_REQUEST_MESSAGE_BYTES, MAX_STATE_BLOB_BYTES, PROTOCOL_VERSION, GiB

MiB = 1 << 20


def make_vcpu(vcpu_id: int = 0, **blobs: bytes) -> VcpuState:
    fields = dict(
        regs=b"r" * 144, sregs=b"s" * 312, fpu=b"f" * 416, xsave=b"x" * 4096, xcrs=b"c" * 392,
        lapic=b"l" * 1024, events=b"e" * 64, mp_state=b"\0" * 4, debugregs=b"d" * 128,
        cpuid=b"i" * 48, msrs=bytes(16 * 3),
    )  # fmt: skip
    fields.update(blobs)
    return VcpuState(id=vcpu_id, **fields)


def make_header(**overrides: Any) -> MigrationHeader:
    """Two regions (16 pages at 0, 6 pages at 1 MiB); page 0 eager (make_zero_map: 2 and 17 zero)."""
    fields: dict[str, Any] = dict(
        migration_id="mig-1_A",
        page_size=PAGE_SIZE,
        regions=[MemoryRegion(0, 16 * PAGE_SIZE), MemoryRegion(MiB, 6 * PAGE_SIZE)],
        vcpus=[make_vcpu(0), make_vcpu(1)],
        vm_state=VmState(clock=b"k" * 48, irqchip=[b"p" * 520, b"q" * 520, b"o" * 520], pit2=b"t" * 112),
        devices={"uart0": b"\x01\x02", "guest_services": b""},
        eager=[PageRun(0, b"\x07" * PAGE_SIZE)],
        paused_at_ns=123_456_789,
        boot_id="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        workload={"name": "memtouch", "seed": 42},
    )
    fields.update(overrides)
    return MigrationHeader(**fields)


def make_zero_map(bitmap: bytes = bytes([0b100, 0, 0b10]), migration_id: str = "mig-1_A") -> ZeroMap:
    """make_header's zero map: pages 2 and 17 are zero."""
    return ZeroMap(migration_id, bitmap)


def wire(message: Any) -> dict[str, Any]:
    """The message as its raw msgpack map, to be tampered with."""
    return msgpack.unpackb(message.encode())


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj)


def resealed(header: dict[str, Any]) -> bytes:
    """A tampered header map with its checksum made right again, so the decoder gets past it to
    the field checks (as a forger, not the network, would)."""
    header.pop("sum")
    header["sum"] = xxh3_64_intdigest(msgpack.packb(header))
    return msgpack.packb(header)


# --- round trips


def test_header_round_trips_through_encode_and_decode() -> None:
    header = make_header()
    decoded = MigrationHeader.decode(header.encode())
    assert decoded == header
    assert decode_any(header.encode()) == header
    assert isinstance(decoded.regions, tuple) and isinstance(decoded.vm_state.irqchip, tuple)


def test_header_with_no_eager_pages_devices_or_workload_round_trips() -> None:
    header = make_header(eager=[], devices={}, workload={}, vm_state=VmState(b"", [], b""))
    assert MigrationHeader.decode(header.encode()) == header


def test_page_request_round_trips_for_every_kind() -> None:
    for kind in ("demand", "readahead", "background"):
        request = PageRequest(0x7000, MAX_BATCH_PAGES, kind)
        assert PageRequest.decode(request.encode()) == request
        assert decode_any(request.encode()) == request
        assert len(request.encode()) <= MAX_REQUEST_MESSAGE_BYTES


def test_page_batch_round_trips_and_verifies() -> None:
    memory = os.urandom(4 * PAGE_SIZE)
    encoded = build_page_batch(0x10000, 4, memory)
    batch = PageBatch.decode(encoded)
    batch.verify()
    assert batch.data == memory and batch.zero == b"\0" and batch.sum == pages_sum(memory)
    assert PageBatch.decode(batch.encode()) == batch
    assert decode_any(encoded) == batch


def test_full_batch_of_random_pages_fits_its_message_limit() -> None:
    encoded = build_page_batch(0, MAX_BATCH_PAGES, os.urandom(MAX_BATCH_PAGES * PAGE_SIZE))
    assert len(encoded) <= MAX_BATCH_MESSAGE_BYTES
    PageBatch.decode(encoded).verify()


def test_complete_and_error_reply_round_trip() -> None:
    complete = Complete("mig-1", {"demand_faults": 12, "bytes": 2**64 - 1})
    assert Complete.decode(complete.encode()) == complete == decode_any(complete.encode())
    error = ErrorReply(416, "gpa 0x1000000 is in no memory region ✓")
    assert ErrorReply.decode(error.encode()) == error == decode_any(error.encode())


# --- build_page_batch and the batch helpers


def test_build_page_batch_leaves_zero_pages_out_of_data() -> None:
    pages = [os.urandom(PAGE_SIZE), bytes(PAGE_SIZE), bytes(PAGE_SIZE), os.urandom(PAGE_SIZE)]
    batch = PageBatch.decode(build_page_batch(0x2000, 4, b"".join(pages)))
    assert batch.zero == bytes([0b0110])
    assert batch.data == pages[0] + pages[3]
    assert batch.sum == pages_sum(pages[0] + pages[3])


def test_a_page_that_only_starts_or_ends_with_zeros_is_data() -> None:
    starts = bytes(8) + os.urandom(PAGE_SIZE - 8)  # its first qword zero: compared whole
    ends = os.urandom(8) + bytes(PAGE_SIZE - 8)
    last_byte = bytes(PAGE_SIZE - 1) + b"\x01"
    pages = [starts, bytes(PAGE_SIZE), ends, last_byte, bytes(PAGE_SIZE)]
    batch = PageBatch.decode(build_page_batch(0, 5, b"".join(pages)))
    assert batch.zero == bytes([0b10010])
    assert batch.data == starts + ends + last_byte


def test_build_page_batch_of_all_zero_pages_has_no_data() -> None:
    batch = PageBatch.decode(build_page_batch(0, 9, bytearray(9 * PAGE_SIZE)))
    assert batch.zero == b"\xff\x01" and batch.data == b"" and batch.sum == pages_sum(b"")
    assert list(batch.runs()) == [(0, 9, None)]


def test_build_page_batch_accepts_a_memoryview_of_memory() -> None:
    memory = bytearray(os.urandom(3 * PAGE_SIZE))
    batch = PageBatch.decode(build_page_batch(PAGE_SIZE, 3, memoryview(memory)))
    assert batch.data == memory


def test_build_page_batch_rejects_memory_of_the_wrong_length() -> None:
    with pytest.raises(ProtoError, match="memory must be count"):
        build_page_batch(0, 2, bytes(PAGE_SIZE))


def test_build_page_batch_rejects_misaligned_gpa_and_bad_count() -> None:
    with pytest.raises(ProtoError, match="gpa must be page-aligned"):
        build_page_batch(0x1001, 1, bytes(PAGE_SIZE))
    with pytest.raises(ProtoError, match="count"):
        build_page_batch(0, MAX_BATCH_PAGES + 1, bytes((MAX_BATCH_PAGES + 1) * PAGE_SIZE))


def test_runs_groups_contiguous_pages_of_the_same_kind() -> None:
    a, b, c = os.urandom(PAGE_SIZE), os.urandom(PAGE_SIZE), os.urandom(PAGE_SIZE)
    zero = bytes(PAGE_SIZE)
    batch = PageBatch.decode(build_page_batch(0x100000, 6, a + b + zero + zero + c + zero))
    runs = [(gpa, n, None if data is None else bytes(data)) for gpa, n, data in batch.runs()]
    assert runs == [
        (0x100000, 2, a + b),
        (0x102000, 2, None),
        (0x104000, 1, c),
        (0x105000, 1, None),
    ]


def test_verify_names_the_batch_whose_data_fails_its_checksum() -> None:
    memory = os.urandom(PAGE_SIZE) + bytes(PAGE_SIZE) + os.urandom(2 * PAGE_SIZE)
    batch = PageBatch.decode(build_page_batch(0x40000, 4, memory))
    corrupt = bytearray(batch.data)
    corrupt[PAGE_SIZE + 5] ^= 0xFF  # the second page in data is the batch's third page
    bad = replace(batch, data=bytes(corrupt))
    with pytest.raises(ProtoError, match=r"the 3 data pages of the batch at gpa 0x40000 \(count 4\) fail their checksum"):
        bad.verify()


def test_verify_rejects_a_wrong_sum_with_intact_data() -> None:
    batch = PageBatch.decode(build_page_batch(0, 2, os.urandom(2 * PAGE_SIZE)))
    bad = replace(batch, sum=batch.sum ^ 1)
    with pytest.raises(ProtoError, match="batch at gpa 0x0 .* fail their checksum"):
        bad.verify()


def test_check_answers_rejects_a_batch_for_another_request() -> None:
    batch = PageBatch.decode(build_page_batch(0x5000, 2, os.urandom(2 * PAGE_SIZE)))
    batch.check_answers(PageRequest(0x5000, 2, "demand"))
    with pytest.raises(ProtoError, match="response for gpa 0x5000 does not match request gpa 0x6000"):
        batch.check_answers(PageRequest(0x6000, 2, "demand"))
    with pytest.raises(ProtoError, match="response count 2 .* does not match request count 1"):
        batch.check_answers(PageRequest(0x5000, 1, "demand"))


# --- PageBatch length rules


def batch_wire(count: int = 4) -> dict[str, Any]:
    memory = os.urandom(PAGE_SIZE) + bytes(PAGE_SIZE) + os.urandom((count - 2) * PAGE_SIZE)
    return msgpack.unpackb(build_page_batch(0x8000, count, memory))


@pytest.mark.parametrize(
    ("field", "transform", "error"),
    [
        ("zero", lambda v: v + b"\0", "zero must be exactly 1 bytes, got 2"),
        ("zero", lambda v: bytes([v[0] | 0x80]), "zero has bits set past its 4 pages"),
        ("data", lambda v: v[:-1], "data must be bytes holding the 3 non-zero pages"),
        ("data", lambda v: v + bytes(PAGE_SIZE), "data must be bytes holding the 3 non-zero pages"),
        ("sum", lambda v: -1, "sum must be in"),
        ("sum", lambda v: b"\0" * 8, "sum must be"),
        ("count", lambda v: 0, "count must be in"),
        ("count", lambda v: MAX_BATCH_PAGES + 1, "count must be in"),
        ("gpa", lambda v: v + 1, "gpa must be page-aligned"),
        ("gpa", lambda v: -PAGE_SIZE, "outside"),
        ("gpa", lambda v: 1 << 52, "outside"),
    ],
)
def test_page_batch_decode_rejects_inconsistent_fields(field: str, transform: Any, error: str) -> None:
    obj = batch_wire()
    obj[field] = transform(obj[field])
    with pytest.raises(ProtoError, match=error):
        PageBatch.decode(pack(obj))


def test_page_batch_decode_rejects_data_over_the_batch_limit() -> None:
    obj = batch_wire()
    obj["data"] = bytes(MAX_BATCH_PAGES * PAGE_SIZE + 1)
    with pytest.raises(ProtoError, match="exceeds max_bin_len"):
        PageBatch.decode(pack(obj))
    obj["data"] = bytes(2 * MAX_BATCH_PAGES * PAGE_SIZE)
    with pytest.raises(ProtoError, match="page_batch message of 8388.* bytes is over its limit of 4194"):
        PageBatch.decode(pack(obj))


# --- PageRequest rules


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"gpa": 0x1001}, "gpa must be page-aligned .* got 0x1001"),
        ({"gpa": -PAGE_SIZE}, "outside"),
        ({"count": 0}, "count must be in \\[1, 1024\\], got 0"),
        ({"count": MAX_BATCH_PAGES + 1}, "count must be in \\[1, 1024\\], got 1025"),
        ({"count": True}, "count must be an int, got True"),
        ({"count": 1.0}, "count must be an int, got 1.0"),
        ({"kind": "eager"}, "kind must be one of .* got 'eager'"),
        ({"kind": 1}, "kind must be one of"),
        ({"kind": {}}, "kind must be one of"),  # unhashable: a TypeError, not a ProtoError, before
    ],
)
def test_page_request_rejects_bad_fields(fields: dict[str, Any], error: str) -> None:
    obj = wire(PageRequest(0x1000, 1, "demand")) | fields
    with pytest.raises(ProtoError, match=error):
        PageRequest.decode(pack(obj))
    with pytest.raises(ProtoError, match=error):
        PageRequest(**{k: v for k, v in obj.items() if k not in ("v", "t")})


@pytest.mark.parametrize("kind", [{}, [{}], [1]])
def test_any_answerable_message_with_an_unhashable_kind_is_a_proto_error(kind: object) -> None:
    """decode_any, as the page socket reads a request: a kind that is a map, or a list holding
    one, is refused with a ProtoError (answered with a 400), never another exception."""
    with pytest.raises(ProtoError, match="kind must be one of"):
        decode_any(pack(wire(PageRequest(0x1000, 1, "demand")) | {"kind": kind}))


def test_validate_range_accepts_a_run_inside_one_region() -> None:
    regions = make_header().regions
    PageRequest(0, 16, "demand").validate_range(regions)
    PageRequest(MiB + 5 * PAGE_SIZE, 1, "background").validate_range(regions)


def test_validate_range_rejects_a_gpa_in_no_region() -> None:
    with pytest.raises(ProtoError, match="gpa 0x10000 is in no memory region"):
        PageRequest(16 * PAGE_SIZE, 1, "demand").validate_range(make_header().regions)


def test_validate_range_rejects_a_run_past_the_end_of_its_region() -> None:
    with pytest.raises(ProtoError, match="count 2 from gpa 0xf000 runs past the end of the region"):
        PageRequest(15 * PAGE_SIZE, 2, "readahead").validate_range(make_header().regions)


# --- the envelope


def test_decode_rejects_another_protocol_version() -> None:
    obj = wire(PageRequest(0, 1, "demand")) | {"v": 2}  # version 2 carried the zero map in the header
    with pytest.raises(ProtoError, match=f"^unsupported protocol version 2, this side speaks {PROTOCOL_VERSION}$"):
        PageRequest.decode(pack(obj))
    with pytest.raises(ProtoError, match="unsupported protocol version 2"):
        decode_any(pack(obj))


@pytest.mark.parametrize("version", [None, True, "1", 1.0])
def test_decode_rejects_a_missing_or_mistyped_version(version: Any) -> None:
    obj = wire(Complete("m", {}))
    if version is None:
        del obj["v"]
    else:
        obj["v"] = version
    with pytest.raises(ProtoError, match="unsupported protocol version"):
        Complete.decode(pack(obj))


def test_decode_rejects_a_message_of_another_type() -> None:
    with pytest.raises(ProtoError, match="expected a page_batch message, got t='page_request'"):
        PageBatch.decode(PageRequest(0, 1, "demand").encode())


def test_decode_any_rejects_an_unknown_type() -> None:
    with pytest.raises(ProtoError, match="unknown message type t='hello'"):
        decode_any(pack({"v": PROTOCOL_VERSION, "t": "hello"}))
    with pytest.raises(ProtoError, match="unknown message type t=<tuple"):
        decode_any(pack({"v": PROTOCOL_VERSION, "t": [1]}))


def test_decode_rejects_unknown_and_missing_fields() -> None:
    obj = wire(ErrorReply(400, "bad")) | {"extra": 1}
    with pytest.raises(ProtoError, match="^error: unknown field 'extra'$"):
        ErrorReply.decode(pack(obj))
    del obj["extra"], obj["code"]
    with pytest.raises(ProtoError, match="^error: missing field 'code'$"):
        ErrorReply.decode(pack(obj))


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "malformed"),
        (b"\xc1", "malformed"),
        (pack(5), "must be a msgpack map"),
        (pack([1, 2]), "malformed .* exceeds max_array_len"),
        (PageRequest(0, 1, "demand").encode() + b"\0", "malformed"),
        (pack({"v": PROTOCOL_VERSION, "t": "page_request", "gpa": msgpack.ExtType(1, b"x")}), "malformed"),
        (pack({1: 1}), "malformed"),
        (b"\x81\xa1a" * 40 + b"\x01", "unsupported protocol version None"),
        ("not bytes", "must be bytes"),
    ],
)
def test_decode_rejects_malformed_input(data: Any, error: str) -> None:
    with pytest.raises(ProtoError, match=error):
        PageRequest.decode(data)
    with pytest.raises(ProtoError):
        decode_any(data)


def test_decode_any_rejects_deeply_nested_input() -> None:
    with pytest.raises(ProtoError, match="malformed"):
        decode_any(b"\x91" * 100_000 + b"\x01")


def test_decode_rejects_a_string_over_the_message_limit() -> None:
    obj = wire(PageRequest(0, 1, "demand")) | {"kind": "x" * 100}
    with pytest.raises(ProtoError, match="over its limit|malformed"):
        PageRequest.decode(pack(obj))


# --- MigrationHeader rules


def test_header_helpers_locate_pages_in_the_zero_map() -> None:
    header = make_header()
    assert header.total_pages == 22
    assert header.page_index(MiB + PAGE_SIZE) == 17
    header.check_zero_map(make_zero_map())
    with pytest.raises(ProtoError, match="in no memory region"):
        header.page_index(16 * PAGE_SIZE)


@pytest.mark.parametrize(
    ("zero_map", "error"),
    [
        (make_zero_map(bytes(2)), "zero_bitmap must be exactly 3 bytes, got 2"),
        (make_zero_map(bytes(4)), "zero_bitmap must be exactly 3 bytes, got 4"),
        (make_zero_map(bytes([0b100, 0, 0b10 | 0x40])), "zero_bitmap has bits set past its 22 pages"),
        (make_zero_map(bytes([0b101, 0, 0])), "zero_bitmap marks page at gpa 0x0 of eager\\[0\\] zero"),
        (make_zero_map(migration_id="mig-2"), "zero map of migration 'mig-2', the header's is 'mig-1_A'"),
    ],
)
def test_a_zero_map_that_does_not_fit_the_header_is_refused(zero_map: ZeroMap, error: str) -> None:
    with pytest.raises(ProtoError, match=error):
        make_header().check_zero_map(zero_map)


def test_a_zero_map_is_checked_against_eager_runs_of_several_pages() -> None:
    header = make_header(eager=[PageRun(0, b"\1" * 3 * PAGE_SIZE)])
    with pytest.raises(ProtoError, match="page at gpa 0x2000 of eager\\[0\\] zero"):
        header.check_zero_map(make_zero_map())
    header.check_zero_map(make_zero_map(bytes([0, 0, 0b10])))


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"migration_id": ""}, "migration_id must match"),
        ({"migration_id": "a" * 65}, "migration_id must be at most 64 characters"),
        ({"migration_id": "bad id"}, "migration_id must match .* got 'bad id'"),
        ({"migration_id": "mig\n"}, "migration_id must match"),
        ({"page_size": 8192}, "page_size must be 4096, got 8192"),
        ({"regions": []}, "regions must have 1..32 items, got 0"),
        ({"regions": [MemoryRegion(MiB, PAGE_SIZE), MemoryRegion(0, PAGE_SIZE)]}, "sorted and not overlap"),
        (
            {"regions": [MemoryRegion(0, 2 * PAGE_SIZE), MemoryRegion(PAGE_SIZE, PAGE_SIZE)]},
            "sorted and not overlap",
        ),
        (
            {"regions": [MemoryRegion(0, 40 * GiB), MemoryRegion(40 * GiB, 40 * GiB)]},
            "regions total .* over the limit",
        ),
        ({"vcpus": []}, "vcpus must have 1..32 items"),
        (
            {"vcpus": [make_vcpu(i) for i in range(32)] + [make_vcpu(0)]},
            "vcpus must have 1..32 items, got 33",
        ),
        ({"vcpus": [make_vcpu(1), make_vcpu(1)]}, "vcpus ids must be unique"),
        ({"vm_state": None}, "vm_state must be a VmState"),
        ({"devices": {"UART": b""}}, "devices key must match"),
        ({"devices": {"d" * 33: b""}}, "devices key must be at most 32 characters"),
        ({"devices": {f"d{i}": b"" for i in range(17)}}, "devices must have at most 16 entries"),
        ({"devices": {"uart0": b"x" * (1 * MiB + 1)}}, "devices\\['uart0'\\] must be 0..1048576 bytes"),
        ({"devices": {"uart0": "text"}}, "devices\\['uart0'\\] must be bytes"),
        ({"eager": [PageRun(16 * PAGE_SIZE, bytes(PAGE_SIZE))]}, "not wholly inside one memory region"),
        ({"eager": [PageRun(15 * PAGE_SIZE, b"\1" * 2 * PAGE_SIZE)]}, "not wholly inside one memory region"),
        (
            {"eager": [PageRun(PAGE_SIZE, b"\1" * PAGE_SIZE), PageRun(0, b"\1" * PAGE_SIZE)]},
            "out of order or overlaps",
        ),
        (
            {"eager": [PageRun(0, b"\1" * 2 * PAGE_SIZE), PageRun(PAGE_SIZE, b"\1" * PAGE_SIZE)]},
            "out of order or overlaps",
        ),
        ({"paused_at_ns": -1}, "paused_at_ns must be in"),
        ({"paused_at_ns": 2**63}, "paused_at_ns must be in"),
        ({"boot_id": ""}, "boot_id must match"),
        ({"boot_id": 7}, "boot_id must be a str, got 7"),
        ({"workload": {"Name": "x"}}, "workload key must match"),
        ({"workload": {"ratio": 0.5}}, "workload\\['ratio'\\] must be an int, got 0.5"),
        ({"workload": {"name": "x" * 257}}, "workload\\['name'\\] must be at most 256 characters"),
        ({"workload": {"seed": 2**63}}, "workload\\['seed'\\] must be in"),
        ({"workload": [1]}, "workload must be a map"),
    ],
)
def test_header_rejects_invalid_fields(overrides: dict[str, Any], error: str) -> None:
    with pytest.raises(ProtoError, match=error):
        make_header(**overrides)


def test_header_rejects_too_many_eager_bytes() -> None:
    half = 33 * MiB
    with pytest.raises(ProtoError, match="eager runs total 69206016 bytes, over the limit of 67108864"):
        make_header(
            regions=[MemoryRegion(0, 2 * half)],
            eager=[PageRun(0, b"\1" * half), PageRun(half, b"\1" * half)],
        )


@pytest.mark.parametrize(
    ("blobs", "error"),
    [
        ({"regs": b""}, "regs must be 1..65536 bytes, got 0"),
        ({"sregs": b""}, "sregs must be 1..65536 bytes, got 0"),
        ({"xsave": bytes(MAX_STATE_BLOB_BYTES + 1)}, "xsave must be 0..65536 bytes, got 65537"),
        ({"cpuid": bytearray(8)}, "cpuid must be bytes, got <bytearray"),
        ({"msrs": bytes(17)}, "msrs must be whole 16-byte kvm_msr_entry records, got 17 bytes"),
    ],
)
def test_vcpu_state_rejects_bad_blobs(blobs: dict[str, Any], error: str) -> None:
    with pytest.raises(ProtoError, match=error):
        make_vcpu(0, **blobs)


def test_vcpu_state_accepts_empty_optional_blobs() -> None:
    make_vcpu(
        3,
        fpu=b"",
        xsave=b"",
        xcrs=b"",
        lapic=b"",
        events=b"",
        mp_state=b"",
        debugregs=b"",
        cpuid=b"",
        msrs=b"",
    )


@pytest.mark.parametrize("vcpu_id", [-1, 32, "0"])
def test_vcpu_state_rejects_bad_id(vcpu_id: Any) -> None:
    with pytest.raises(ProtoError, match="id must be"):
        make_vcpu(vcpu_id)


def test_vm_state_rejects_too_many_or_mistyped_irqchips() -> None:
    with pytest.raises(ProtoError, match="irqchip must have 0..8 items, got 9"):
        VmState(b"", [b""] * 9, b"")
    with pytest.raises(ProtoError, match="irqchip\\[1\\] must be a bytes, got 'x'"):
        VmState(b"", [b"", "x"], b"")
    with pytest.raises(ProtoError, match="pit2 must be 0..65536 bytes"):
        VmState(b"", [], bytes(MAX_STATE_BLOB_BYTES + 1))


@pytest.mark.parametrize(
    ("gpa", "size", "error"),
    [
        (0x1001, PAGE_SIZE, "gpa must be page-aligned"),
        (0, 0, "size must be in"),
        (0, 100, "size must be in"),
        (0, PAGE_SIZE + 1, "size must be a multiple of 4096"),
        ((1 << 52) - PAGE_SIZE, 2 * PAGE_SIZE, "outside"),
        (0, 65 * GiB, "size must be in"),
    ],
)
def test_memory_region_rejects_bad_bounds(gpa: int, size: int, error: str) -> None:
    with pytest.raises(ProtoError, match=error):
        MemoryRegion(gpa, size)


@pytest.mark.parametrize(
    ("gpa", "data", "error"),
    [
        (0x800, bytes(PAGE_SIZE), "gpa must be page-aligned"),
        (0, b"", "data must be 4096"),
        (0, bytes(PAGE_SIZE + 1), "data must be a whole number of pages"),
        (0, bytearray(PAGE_SIZE), "data must be bytes"),
    ],
)
def test_page_run_rejects_bad_runs(gpa: int, data: Any, error: str) -> None:
    with pytest.raises(ProtoError, match=error):
        PageRun(gpa, data)


def test_header_decode_names_where_a_nested_field_is_wrong() -> None:
    obj = wire(make_header())
    obj["regions"][1]["gpa"] = MiB + 1
    with pytest.raises(ProtoError, match="^regions\\[1\\]: gpa must be page-aligned .* got 0x100001$"):
        MigrationHeader.decode(resealed(obj))
    obj = wire(make_header())
    obj["vcpus"][0]["lapic"] = "text"
    with pytest.raises(ProtoError, match="vcpus\\[0\\]: lapic must be bytes"):
        MigrationHeader.decode(resealed(obj))
    obj = wire(make_header())
    del obj["vm_state"]["pit2"]
    with pytest.raises(ProtoError, match="^vm_state: missing field 'pit2'$"):
        MigrationHeader.decode(resealed(obj))
    obj = wire(make_header())
    obj["eager"] = [7]
    with pytest.raises(ProtoError, match="eager\\[0\\] must be a map, got 7"):
        MigrationHeader.decode(resealed(obj))
    obj = wire(make_header())
    obj["regions"] = {"gpa": 0}
    with pytest.raises(ProtoError, match="regions must be a list"):
        MigrationHeader.decode(resealed(obj))


def test_a_header_damaged_on_the_way_is_refused() -> None:
    """One flipped bit anywhere in the eager pages or the vCPU state would be installed as it
    is: the header's own checksum refuses it."""
    header = make_header()
    good = header.encode()
    assert MigrationHeader.decode(good) == header
    for index in (good.index(header.eager[0].data) + 100, good.index(header.vcpus[0].regs), len(good) // 2):
        damaged = bytearray(good)
        damaged[index] ^= 0x01
        with pytest.raises(ProtoError):
            MigrationHeader.decode(bytes(damaged))
    obj = wire(header)
    obj["paused_at_ns"] += 1  # well-formed, but not what was sent
    with pytest.raises(ProtoError, match="checksum mismatch"):
        MigrationHeader.decode(pack(obj))


def test_a_zero_map_round_trips_and_one_damaged_on_the_way_is_refused() -> None:
    """One flipped bit in the zero map would install a data page as zeros: its checksum refuses it."""
    zero_map = make_zero_map()
    good = zero_map.encode()
    assert ZeroMap.decode(good) == zero_map == decode_any(good)
    damaged = bytearray(good)
    damaged[good.index(zero_map.zero_bitmap)] ^= 0x01
    with pytest.raises(ProtoError, match="checksum mismatch"):
        ZeroMap.decode(bytes(damaged))
    with pytest.raises(ProtoError, match="zero_bitmap must be 1.."):
        ZeroMap("mig-1_A", b"")


# --- Complete and ErrorReply rules


@pytest.mark.parametrize(
    ("migration_id", "stats", "error"),
    [
        ("bad/id", {}, "migration_id must match"),
        ("m", {"Faults": 1}, "stats key must match"),
        ("m", {"faults": -1}, "stats\\['faults'\\] must be in"),
        ("m", {"faults": 2**64}, "stats\\['faults'\\] must be in"),
        ("m", {"faults": "1"}, "stats\\['faults'\\] must be an int"),
        ("m", {f"s{i}": 0 for i in range(65)}, "stats must have at most 64 entries"),
    ],
)
def test_complete_rejects_bad_fields(migration_id: str, stats: Any, error: str) -> None:
    with pytest.raises(ProtoError, match=error):
        Complete(migration_id, stats)


@pytest.mark.parametrize(
    ("code", "message", "error"),
    [
        (200, "ok", "code must be in \\[400, 599\\], got 200"),
        (600, "x", "code must be in"),
        (400, "x" * 1025, "message must be at most 1024 characters"),
        (400, b"x", "message must be a str"),
    ],
)
def test_error_reply_rejects_bad_fields(code: int, message: Any, error: str) -> None:
    with pytest.raises(ProtoError, match=error):
        ErrorReply(code, message)


def test_error_reply_decode_names_the_type_on_a_bad_field() -> None:
    obj = wire(ErrorReply(404, "no")) | {"code": 302}
    with pytest.raises(ProtoError, match="^error: code must be in \\[400, 599\\], got 302$"):
        decode_any(pack(obj))
