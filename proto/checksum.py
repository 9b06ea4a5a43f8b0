"""The page checksum: xxh3_64 (seed 0) of the pages a PageBatch carries, over all of them at once."""

from typing import TypeAlias

from xxhash import xxh3_64_intdigest

__all__ = ["Buffer", "pages_sum"]

# What the helpers accept: anything with the buffer protocol (bytes, a view of guest memory).
Buffer: TypeAlias = bytes | bytearray | memoryview


def pages_sum(data: Buffer) -> int:
    """The checksum of `data` (pages back to back, hashed in place, never copied) as an
    unsigned 64-bit int."""
    return xxh3_64_intdigest(data)
