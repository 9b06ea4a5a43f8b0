"""Page checksums: xxh3_64 of each 4 KiB page, carried as 8-byte little-endian digests."""

import struct
from typing import TypeAlias

from xxhash import xxh3_64_intdigest

from proto.errors import ProtoError
from proto.version import CHECKSUM_SIZE, PAGE_SIZE

__all__ = ["Buffer", "page_sum", "page_sums", "unpack_sums"]

# What the helpers accept: anything with the buffer protocol (bytes, a view of guest memory).
Buffer: TypeAlias = bytes | bytearray | memoryview


def page_sum(page: Buffer) -> int:
    """The checksum of one page (or any buffer) as an unsigned 64-bit int."""
    return xxh3_64_intdigest(page)


def page_sums(data: Buffer) -> bytes:
    """One 8-byte little-endian xxh3_64 digest per page of `data`, back to back.

    `data` must be a whole number of pages; it is hashed in place, never copied. A single page
    (every demand fault without readahead) takes a path with no view or list.
    """
    if len(data) == PAGE_SIZE and (type(data) is bytes or memoryview(data).nbytes == PAGE_SIZE):
        return xxh3_64_intdigest(data).to_bytes(CHECKSUM_SIZE, "little")
    view = memoryview(data).cast("B")
    end = view.nbytes
    if end % PAGE_SIZE:
        raise ProtoError(f"page_sums needs whole pages, got {end} bytes")
    npages = end // PAGE_SIZE
    return struct.pack(
        f"<{npages}Q", *map(xxh3_64_intdigest, [view[o : o + PAGE_SIZE] for o in range(0, end, PAGE_SIZE)])
    )


def unpack_sums(sums: Buffer) -> tuple[int, ...]:
    """The digests of a `page_sums` blob as ints."""
    view = memoryview(sums).cast("B")
    return struct.unpack(f"<{view.nbytes // CHECKSUM_SIZE}Q", view)
