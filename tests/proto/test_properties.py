"""Properties of the wire format over generated input: decoders fail only with ProtoError,
valid messages round-trip, and a page batch carries memory exactly and detects corruption."""

import contextlib
import os
from dataclasses import replace
from itertools import pairwise
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import (
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    PROTOCOL_VERSION,
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
    ZeroMap,
    build_page_batch,
    decode_any,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=64)
names = st.text(alphabet="abz09_", min_size=1, max_size=32)
gpas = st.integers(0, (1 << 40) // PAGE_SIZE).map(lambda page: page * PAGE_SIZE)
blobs = st.binary(max_size=64)

page_requests = st.builds(
    PageRequest,
    gpa=gpas,
    count=st.integers(1, MAX_BATCH_PAGES),
    kind=st.sampled_from(["demand", "readahead", "background"]),
)
completes = st.builds(
    Complete,
    migration_id=ids,
    stats=st.dictionaries(st.text("abc_", min_size=1, max_size=8), st.integers(0, 2**64 - 1), max_size=8),
)
error_replies = st.builds(ErrorReply, code=st.integers(400, 599), message=st.text(max_size=100))
vcpus = st.builds(
    VcpuState,
    id=st.integers(0, 31),
    regs=st.binary(min_size=1, max_size=64),
    sregs=st.binary(min_size=1, max_size=64),
    fpu=blobs, xsave=blobs, xcrs=blobs, lapic=blobs, events=blobs,
    mp_state=blobs, debugregs=blobs, cpuid=blobs,
    msrs=st.integers(0, 4).map(lambda n: os.urandom(16 * n)),
)  # fmt: skip
vm_states = st.builds(VmState, clock=blobs, irqchip=st.lists(blobs, max_size=3), pit2=blobs)


@st.composite
def page_batches(draw: st.DrawFn) -> tuple[int, int, bytes]:
    """(gpa, count, memory) with a random mix of zero and random pages."""
    count = draw(st.one_of(st.integers(1, 40), st.just(MAX_BATCH_PAGES)))
    zero = (
        draw(st.lists(st.booleans(), min_size=count, max_size=count))
        if count <= 40
        else [i % 3 == 0 for i in range(count)]
    )
    memory = b"".join(bytes(PAGE_SIZE) if is_zero else os.urandom(PAGE_SIZE) for is_zero in zero)
    return draw(gpas), count, memory


@st.composite
def headers(draw: st.DrawFn) -> tuple[MigrationHeader, ZeroMap]:
    """A header and a zero map that fits it (no eager page marked zero)."""
    regions = []
    gpa = 0
    for _ in range(draw(st.integers(1, 4))):
        gpa += draw(st.integers(0, 64)) * PAGE_SIZE
        size = draw(st.integers(1, 40)) * PAGE_SIZE
        regions.append(MemoryRegion(gpa, size))
        gpa += size
    total_pages = sum(region.npages for region in regions)
    zero_bits = draw(st.integers(0, (1 << total_pages) - 1))
    page_gpas = [region.gpa + i * PAGE_SIZE for region in regions for i in range(region.npages)]
    eager_pages = draw(
        st.lists(
            st.sampled_from([i for i in range(total_pages) if not zero_bits >> i & 1] or [None]),
            unique=True,
            max_size=5,
        )
    )
    eager = [
        PageRun(page_gpas[i], os.urandom(PAGE_SIZE)) for i in sorted(p for p in eager_pages if p is not None)
    ]
    vcpu_list = draw(st.lists(vcpus, min_size=1, max_size=3, unique_by=lambda vcpu: vcpu.id))
    header = MigrationHeader(
        migration_id=draw(ids),
        page_size=PAGE_SIZE,
        regions=regions,
        vcpus=vcpu_list,
        vm_state=draw(vm_states),
        devices=draw(st.dictionaries(names, blobs, max_size=4)),
        eager=eager,
        paused_at_ns=draw(st.integers(0, 2**63 - 1)),
        boot_id=draw(ids),
        workload=draw(
            st.dictionaries(
                names, st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=20)), max_size=4
            )
        ),
    )
    return header, ZeroMap(header.migration_id, zero_bits.to_bytes((total_pages + 7) // 8, "little"))


messages = st.one_of(page_requests, completes, error_replies, headers().flatmap(lambda pair: st.sampled_from(pair)))

# Arbitrary msgpack values, to reach the field checks rather than stop at the parser.
msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=20),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


def decodes_or_raises_proto_error(data: bytes) -> None:
    with contextlib.suppress(ProtoError):
        decode_any(data)


@FAST
@given(st.binary(max_size=512))
def test_decode_any_of_arbitrary_bytes_raises_only_proto_error(data: bytes) -> None:
    decodes_or_raises_proto_error(data)


@FAST
@given(
    st.sampled_from(["migration_header", "zero_map", "page_request", "page_batch", "complete", "error", "x"]),
    st.dictionaries(st.text(max_size=12), msgpack_values, max_size=12),
)
def test_decode_any_of_arbitrary_maps_raises_only_proto_error(
    message_type: str, fields: dict[str, Any]
) -> None:
    decodes_or_raises_proto_error(msgpack.packb({"v": PROTOCOL_VERSION, "t": message_type} | fields))


@FAST
@given(messages, st.data())
def test_decode_any_of_a_mutated_valid_message_raises_only_proto_error(
    message: Any, data: st.DataObject
) -> None:
    encoded = bytearray(message.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    decodes_or_raises_proto_error(bytes(encoded[:cut]))
    decodes_or_raises_proto_error(bytes(encoded))


@FAST
@given(messages)
def test_valid_messages_round_trip(message: Any) -> None:
    encoded = message.encode()
    assert type(message).decode(encoded) == message
    assert decode_any(encoded) == message


@FAST
@given(page_batches())
def test_page_batch_reconstructs_memory_exactly(case: tuple[int, int, bytes]) -> None:
    gpa, count, memory = case
    batch = PageBatch.decode(build_page_batch(gpa, count, memory))
    batch.verify()
    batch.check_answers(PageRequest(gpa, count, "demand"))
    assert PageBatch.decode(batch.encode()) == batch
    rebuilt = bytearray(b"\xaa" * len(memory))
    expected_gpa = gpa
    for run_gpa, npages, data in batch.runs():
        assert run_gpa == expected_gpa and npages >= 1
        offset = run_gpa - gpa
        rebuilt[offset : offset + npages * PAGE_SIZE] = bytes(npages * PAGE_SIZE) if data is None else data
        expected_gpa += npages * PAGE_SIZE
    assert expected_gpa == gpa + count * PAGE_SIZE
    assert rebuilt == memory


@FAST
@given(page_batches())
def test_runs_alternate_between_zero_and_data(case: tuple[int, int, bytes]) -> None:
    batch = PageBatch.decode(build_page_batch(*case))
    kinds = [data is None for _, _, data in batch.runs()]
    assert all(a != b for a, b in pairwise(kinds))


@FAST
@given(page_batches(), st.data())
def test_flipping_any_data_byte_fails_verify(case: tuple[int, int, bytes], data: st.DataObject) -> None:
    batch = PageBatch.decode(build_page_batch(*case))
    if not batch.data:
        return
    index = data.draw(st.integers(0, len(batch.data) - 1))
    corrupt = bytearray(batch.data)
    corrupt[index] ^= data.draw(st.integers(1, 255))
    try:
        replace(batch, data=bytes(corrupt)).verify()
    except ProtoError as error:
        assert f"batch at gpa {batch.gpa:#x} (count {batch.count}) fail their checksum" in str(error)
    else:
        raise AssertionError("verify accepted corrupt data")

@FAST
@given(headers())
def test_a_zero_map_that_marks_no_eager_page_fits_its_header(pair: tuple[MigrationHeader, ZeroMap]) -> None:
    header, zero_map = pair
    header.check_zero_map(ZeroMap.decode(zero_map.encode()))
