"""The pieces of export() that need no guest: the zero-page bitmap and eager-run coalescing."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from postcopy.source.export import coalesce, zero_bitmap
from proto import PAGE_SIZE
from vmm.memory import GuestMemory

MiB = 1 << 20


@pytest.fixture(params=["memfd", "anon"])
def memory(request: pytest.FixtureRequest) -> Iterator[GuestMemory]:
    # Two regions with a hole between them; 8 MiB + 5 pages so the bitmap ends mid-byte.
    memory = GuestMemory.create_layout([(0, 8 * MiB + 5 * PAGE_SIZE), (64 * MiB, 2 * MiB)], request.param)
    yield memory
    memory.close()


def _naive_bitmap(memory: GuestMemory, eager: set[int]) -> bytes:
    resident = memory.resident_pages()
    bitmap = bytearray((memory.pages + 7) // 8)
    for index, flags in enumerate(resident):
        if not flags & 1 and memory.page_gpa(index) not in eager:
            bitmap[index >> 3] |= 1 << (index & 7)
    return bytes(bitmap)


def test_zero_bitmap_marks_pages_the_host_never_had_lsb_first(memory: GuestMemory) -> None:
    touched = [0, 7 * PAGE_SIZE, 8 * MiB + 4 * PAGE_SIZE, 64 * MiB + 9 * PAGE_SIZE]
    for gpa in touched:
        memory.write(gpa, b"\x01")
    bitmap = zero_bitmap(memory)
    assert len(bitmap) == (memory.pages + 7) // 8
    assert bitmap == _naive_bitmap(memory, set())
    assert bitmap[0] == 0b0111_1110  # pages 0 and 7 touched
    for gpa in touched:
        index = memory.page_index(gpa)
        assert not bitmap[index >> 3] >> (index & 7) & 1
    assert int.from_bytes(bitmap, "little") >> memory.pages == 0  # no padding bits


def test_eager_pages_are_never_marked_zero(memory: GuestMemory) -> None:
    eager = {PAGE_SIZE, 64 * MiB}
    bitmap = zero_bitmap(memory, eager)
    assert bitmap == _naive_bitmap(memory, eager)
    assert bitmap[0] & 0b10 == 0


def test_coalesce_joins_contiguous_pages_within_a_region(memory: GuestMemory) -> None:
    memory.write(0x3000, b"abc")
    pages = {0x1000, 0x2000, 0x3000, 0x5000, 8 * MiB + 4 * PAGE_SIZE, 64 * MiB, 64 * MiB + PAGE_SIZE}
    runs = coalesce(memory, pages)
    assert [(run.gpa, run.npages) for run in runs] == [
        (0x1000, 3), (0x5000, 1), (8 * MiB + 4 * PAGE_SIZE, 1), (64 * MiB, 2)]
    assert runs[0].data[2 * PAGE_SIZE : 2 * PAGE_SIZE + 3] == b"abc"
    assert coalesce(memory, ()) == []
