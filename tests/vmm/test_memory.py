"""vmm.memory: guest RAM mappings, GPA arithmetic, access checks, residency and discard."""
from __future__ import annotations

import ctypes

import os
import random
from collections.abc import Iterator

import pytest

from vmm import libc
from vmm.memory import RESIDENT_CHUNK_PAGES, GuestMemory, GuestMemoryError, parse_size

PAGE = 4096
SIZE = 1 << 20  # 256 pages: these tests need no guest


@pytest.fixture(params=["anon", "memfd"])
def mem(request: pytest.FixtureRequest) -> Iterator[GuestMemory]:
    m = GuestMemory.create(SIZE, request.param)
    yield m
    m.close()


@pytest.fixture
def two_regions() -> Iterator[GuestMemory]:
    """Pages 0..3 at gpa 0, pages 4..11 at gpa 1 MiB: a hole in between."""
    m = GuestMemory.create_layout([(0, 4 * PAGE), (1 << 20, 8 * PAGE)])
    yield m
    m.close()


@pytest.mark.parametrize("text,size", [
    ("4096", 4096), ("64K", 64 << 10), ("64M", 64 << 20), ("1G", 1 << 30), ("2T", 2 << 40),
    (" 16m ", 16 << 20), ("256MiB", 256 << 20), ("8MB", 8 << 20), ("1.5K", 1536),
])
def test_parse_size_reads_numbers_with_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "M", "12Q", "1..5M"])
def test_parse_size_rejects_garbage_with_guest_memory_error(text: str) -> None:
    with pytest.raises(GuestMemoryError, match="memory size"):
        parse_size(text)


def test_create_maps_one_region_at_gpa_zero(mem: GuestMemory) -> None:
    assert mem.size == SIZE and mem.pages == SIZE // PAGE
    [r] = mem.regions
    assert (r.slot, r.gpa, r.size, r.first_page) == (0, 0, SIZE, 0)
    assert r.hva != 0 and r.end == SIZE and r.pages == SIZE // PAGE
    assert (r.fd >= 0) == (mem.backing == "memfd")


def test_memfd_backing_is_the_same_memory_as_its_fd() -> None:
    m = GuestMemory.create(SIZE, "memfd")
    try:
        m.write(5 * PAGE + 3, b"through the mapping")
        assert os.pread(m.regions[0].fd, 19, 5 * PAGE + 3) == b"through the mapping"
        os.pwrite(m.regions[0].fd, b"through the fd", 9 * PAGE)
        assert m.read(9 * PAGE, 14) == b"through the fd"
    finally:
        m.close()


@pytest.mark.parametrize("layout", [[(0, 4097)], [(0, 0)], [(100, PAGE)], [(0, -PAGE)]])
def test_create_rejects_unaligned_or_empty_regions(layout: list[tuple[int, int]]) -> None:
    with pytest.raises(GuestMemoryError, match="4 KiB"):
        GuestMemory.create_layout(layout)


def test_create_rejects_overlapping_regions() -> None:
    with pytest.raises(GuestMemoryError, match="overlaps"):
        GuestMemory.create_layout([(0, 2 * PAGE), (PAGE, PAGE)])


def test_page_index_and_page_gpa_are_inverse_across_regions(two_regions: GuestMemory) -> None:
    m = two_regions
    assert m.pages == 12
    assert m.page_index(0) == 0 and m.page_index(3 * PAGE + 5) == 3
    assert m.page_index(1 << 20) == 4 and m.page_index((1 << 20) + 7 * PAGE + 4095) == 11
    for index in range(m.pages):
        assert m.page_index(m.page_gpa(index)) == index
    assert m.page_gpa(4) == 1 << 20


def test_page_index_and_page_gpa_outside_ram_raise(two_regions: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.page_index(4 * PAGE)  # in the hole
    with pytest.raises(GuestMemoryError, match="page index 12"):
        two_regions.page_gpa(12)
    with pytest.raises(GuestMemoryError):
        two_regions.page_gpa(-1)


def test_hva_and_gpa_of_hva_translate_both_ways(two_regions: GuestMemory) -> None:
    m = two_regions
    second = m.regions[1]
    assert m.hva((1 << 20) + 10) == second.hva + 10
    assert m.gpa_of_hva(second.hva + 10) == (1 << 20) + 10
    # Just past a mapping is outside guest RAM, unless the kernel put another region there.
    past = second.hva + second.size
    if not any(r.hva <= past < r.hva + r.size for r in m.regions):
        assert m.gpa_of_hva(past) is None
    buf = ctypes.create_string_buffer(PAGE)
    assert m.gpa_of_hva(ctypes.addressof(buf)) is None


def test_write_then_read_returns_the_bytes(mem: GuestMemory) -> None:
    mem.write(0x1234, b"hello guest")
    assert mem.read(0x1234, 11) == b"hello guest"
    assert mem.read(0x1230, 4) == bytes(4)


def test_view_is_a_writable_window_on_the_same_memory(mem: GuestMemory) -> None:
    view = mem.view(2 * PAGE, PAGE)
    assert len(view) == PAGE and not view.readonly
    view[0:4] = b"abcd"
    assert mem.read(2 * PAGE, 4) == b"abcd"
    mem.write(2 * PAGE + 100, b"xy")
    assert bytes(view[100:102]) == b"xy"


@pytest.mark.parametrize("gpa,length", [(SIZE - 4, 8), (SIZE, 1), (-PAGE, 8)])
def test_access_outside_guest_ram_raises_guest_memory_error(mem: GuestMemory, gpa: int, length: int) -> None:
    with pytest.raises(GuestMemoryError, match="not inside guest RAM"):
        mem.read(gpa, length)
    with pytest.raises(GuestMemoryError, match="not inside guest RAM"):
        mem.write(gpa, bytes(length))
    with pytest.raises(GuestMemoryError, match="not inside guest RAM"):
        mem.view(gpa, length)


def test_access_across_a_hole_between_regions_raises(two_regions: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.read(4 * PAGE - 4, 8)


def test_resident_pages_shows_written_pages_and_not_untouched_ones(mem: GuestMemory) -> None:
    assert not any(b & 1 for b in mem.resident_pages())
    for page in (0, 7, 200):
        mem.write(page * PAGE + 8, b"\x01")
    resident = [i for i, b in enumerate(mem.resident_pages()) if b & 1]
    assert resident == [0, 7, 200]


def test_resident_pages_numbers_pages_across_regions(two_regions: GuestMemory) -> None:
    two_regions.write(1, b"x")
    two_regions.write((1 << 20) + 2 * PAGE, b"y")
    assert [i for i, b in enumerate(two_regions.resident_pages()) if b & 1] == [0, 6]


def test_discard_gives_pages_back_so_they_read_zero(mem: GuestMemory) -> None:
    mem.write(3 * PAGE, b"\xff" * (2 * PAGE))
    mem.write(5 * PAGE, b"kept")
    mem.discard(3 * PAGE, 2 * PAGE)
    assert [i for i, b in enumerate(mem.resident_pages()) if b & 1] == [5]
    assert mem.read(3 * PAGE, 2 * PAGE) == bytes(2 * PAGE)
    assert mem.read(5 * PAGE, 4) == b"kept"


def test_discard_outside_guest_ram_raises(mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        mem.discard(SIZE, PAGE)


def test_close_unmaps_and_is_idempotent() -> None:
    m = GuestMemory.create(SIZE, "memfd")
    fd = m.regions[0].fd
    m.close()
    assert m.regions[0].hva == 0 and m.regions[0].fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    m.close()


def test_file_backing_keeps_regions_back_to_back_in_a_file_that_outlives_the_mapping(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "ram")
    layout = [(0, 4 * PAGE), (1 << 20, 8 * PAGE)]
    m = GuestMemory.create_layout(layout, "file", path=path)
    try:
        assert os.stat(path).st_size == 12 * PAGE and os.stat(path).st_mode & 0o777 == 0o600
        m.write(3 * PAGE, b"A" * PAGE)
        m.write((1 << 20) + PAGE, b"B" * PAGE)  # region 1's second page: file page 5
    finally:
        m.close()
    with open(path, "rb") as f:
        data = f.read()
    assert data[3 * PAGE:4 * PAGE] == b"A" * PAGE and data[5 * PAGE:6 * PAGE] == b"B" * PAGE
    again = GuestMemory.open_file(path, layout)  # what a restarted page server does
    try:
        assert again.read((1 << 20) + PAGE, PAGE) == b"B" * PAGE and again.read(0, PAGE) == bytes(PAGE)
    finally:
        again.close()


def test_resident_pages_and_discard_of_a_file_find_each_region_at_its_offset() -> None:
    """On tmpfs (where a state directory keeps guest RAM), as mincore alone: a disk file's
    page cache would also hold the pages its readahead brought in."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs) on this host")
    path = f"/dev/shm/postcopy-test-resident-{os.getpid()}"
    m = GuestMemory.create_layout([(0, 4 * PAGE), (1 << 20, 8 * PAGE)], "file", path=path)
    try:
        m.write(3 * PAGE, b"A")
        m.write((1 << 20) + PAGE, b"B")  # file page 5
        m.write((1 << 20) + 2 * PAGE, b"C")  # file page 6
        assert [i for i, b in enumerate(m.resident_pages()) if b & 1] == [3, 5, 6]
        m.discard((1 << 20) + 2 * PAGE, PAGE)  # punches file page 6, not file page 2
        assert [i for i, b in enumerate(m.resident_pages()) if b & 1] == [3, 5]
        assert m.read((1 << 20) + PAGE, 1) == b"B"
    finally:
        m.close()
        os.unlink(path)


def test_file_backing_refuses_an_existing_file_a_wrong_size_and_no_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "ram")
    GuestMemory.create(4 * PAGE, "file", path=path).close()
    with pytest.raises(GuestMemoryError, match="cannot open guest RAM file .*exists"):
        GuestMemory.create(4 * PAGE, "file", path=path)
    with pytest.raises(GuestMemoryError, match="holds 16384 bytes, the layout needs 32768"):
        GuestMemory.open_file(path, [(0, 8 * PAGE)])
    with pytest.raises(GuestMemoryError, match="needs a path"):
        GuestMemory.create(4 * PAGE, "file")


def test_resident_pages_of_a_memfd_agree_with_mincore_across_holes_and_chunks() -> None:
    """The memfd path (SEEK_DATA over holes, mincore inside data) against plain mincore."""
    size = (3 * RESIDENT_CHUNK_PAGES + 40) * PAGE
    mem = GuestMemory.create(size, "memfd", "test-resident")
    try:
        rng = random.Random(5)
        written = {0, 1, 2, RESIDENT_CHUNK_PAGES - 1, RESIDENT_CHUNK_PAGES, 2 * RESIDENT_CHUNK_PAGES + 7}
        written |= set(range(RESIDENT_CHUNK_PAGES + 100, RESIDENT_CHUNK_PAGES + 100 + RESIDENT_CHUNK_PAGES + 5))
        written |= {rng.randrange(mem.pages) for _ in range(200)}
        for page in written:
            mem.write(page * PAGE, b"\x01")
        r = mem.regions[0]
        reference = (ctypes.c_ubyte * mem.pages)()
        assert libc.mincore(r.hva, r.size, reference) == 0
        assert [i for i, b in enumerate(mem.resident_pages()) if b & 1] == sorted(written)
        assert [i for i, b in enumerate(reference) if b & 1] == sorted(written)
    finally:
        mem.close()


def test_resident_pages_of_a_file_count_data_that_left_the_page_cache(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A resumed page server maps its RAM file afresh (after a reboot, with a state directory
    on disk, nothing of it is in memory): mincore says no page is there, but the file holds
    them, and a page passed for zero would be installed as zeros on the destination."""
    path = str(tmp_path / "ram")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 64 * PAGE)
        for page in (3, 4, 5, 40, 63):
            os.pwrite(fd, b"\x01" * PAGE, page * PAGE)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean, unmapped: out of the page cache
    finally:
        os.close(fd)
    mem = GuestMemory.open_file(path, [(0, 64 * PAGE)])
    try:
        r = mem.regions[0]
        in_memory = (ctypes.c_ubyte * mem.pages)()
        assert libc.mincore(r.hva, r.size, in_memory) == 0
        if any(b & 1 for b in in_memory):
            pytest.skip(f"{tmp_path} keeps the pages in memory (tmpfs?): nothing left the page cache")
        assert [i for i, b in enumerate(mem.resident_pages()) if b & 1] == [3, 4, 5, 40, 63]
    finally:
        mem.close()
