"""The page checksum: xxh3_64 (seed 0) of the pages a PageBatch carries, over all of them at once."""

from typing import TypeAlias

from xxhash import xxh3_64_intdigest

__all__ = ["Buffer", "pages_sum"]

# What the helpers accept: anything with the buffer protocol (bytes, a view of guest memory).
Buffer: TypeAlias = bytes | bytearray | memoryview


# pages_sum(data) -> int: the checksum of `data` (pages back to back, hashed in place, never
# copied) as an unsigned 64-bit int. The C function itself: a Python wrapper would be one more
# call on the fault path.
pages_sum = xxh3_64_intdigest
