"""The memtouch data pattern and page walk, in Python: the one definition of their constants.

memtouch.py assembles the same arithmetic into the guest from these names; host-side checks
(tests, migration verification) compute what a page must hold from these functions.

A page at global page frame number ``pfn`` and generation ``gen`` holds 512 qwords:
    base    = mix(seed ^ (pfn * PFN_MUL))            (splitmix64's finalizer)
    qword k = base ^ (k * QWORD_MUL) ^ (gen * GEN_MUL if k < HEAD_QWORDS else 0)
so a page copied to the wrong gpa, or an old copy of a rewritten page, fails verification.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator

from vmm.guest.layout import PAGE_SIZE, BootParams

MASK64 = (1 << 64) - 1
QWORDS_PER_PAGE = PAGE_SIZE // 8
HEAD_QWORDS = 8  # qwords 0..7 carry the generation; the rewrite phase rewrites only these

PFN_MUL = 0x9E3779B97F4A7C15  # golden-ratio multiplier spreading pfns before the mix
MIX_SHIFT1, MIX_MUL1 = 30, 0xBF58476D1CE4E5B9  # splitmix64 finalizer, step 1
MIX_SHIFT2, MIX_MUL2 = 27, 0x94D049BB133111EB  # step 2
MIX_SHIFT3 = 31  # step 3
QWORD_MUL = 0xD6E8FEB86659FD93  # C2: makes every qword of a page differ
GEN_MUL = 0xA0761D6478BD642F  # C3: makes every generation of a page's head differ

# The page walk: a 64-bit LCG (Knuth's MMIX constants); the page index is the high 32 bits of
# the state scaled to the slice: ((state >> 32) * npages) >> 32.
LCG_MUL = 6364136223846793005
LCG_INC = 1442695040888963407
WALK_SEED_MUL = 0xE7037ED1A0B428DB  # walk state 0 = seed ^ ((vcpu + 1) * WALK_SEED_MUL)
WALK_SHIFT = 32

_PAGE = struct.Struct(f"<{QWORDS_PER_PAGE}Q")


def page_base(seed: int, pfn: int) -> int:
    x = (seed ^ (pfn * PFN_MUL)) & MASK64
    x = ((x ^ (x >> MIX_SHIFT1)) * MIX_MUL1) & MASK64
    x = ((x ^ (x >> MIX_SHIFT2)) * MIX_MUL2) & MASK64
    return x ^ (x >> MIX_SHIFT3)


def page_qwords(seed: int, pfn: int, gen: int) -> list[int]:
    base = page_base(seed, pfn)
    head = base ^ ((gen * GEN_MUL) & MASK64)
    return [((head if k < HEAD_QWORDS else base) ^ (k * QWORD_MUL)) & MASK64 for k in range(QWORDS_PER_PAGE)]


def page_words(seed: int, pfn: int, gen: int) -> bytes:
    """The 4096 bytes a memtouch page at ``pfn`` holds at generation ``gen``."""
    return _PAGE.pack(*page_qwords(seed, pfn, gen))


def expected_page(params: BootParams, index: int, gen: int) -> bytes:
    """The bytes of page ``index`` of the slice ``params`` describes, at generation ``gen``."""
    if not 0 <= index < params.npages:
        raise IndexError(f"page {index} outside a slice of {params.npages} pages")
    return page_words(params.seed, params.first_pfn + index, gen)


def page_checksum(seed: int, pfn: int, gen: int) -> int:
    """What one page adds to a guest checksum: the sum of its qwords mod 2**64."""
    return sum(page_qwords(seed, pfn, gen)) & MASK64


def sweep_checksum(params: BootParams, gens: list[int]) -> int:
    """The checksum GS_SWEEP_DONE reports for an intact slice whose pages have ``gens``."""
    return sum(page_checksum(params.seed, params.first_pfn + i, g) for i, g in enumerate(gens)) & MASK64


def walk(seed: int, vcpu: int, npages: int) -> Iterator[int]:
    """The page indices vCPU ``vcpu``'s random walk visits, in order."""
    state = (seed ^ ((vcpu + 1) * WALK_SEED_MUL)) & MASK64
    while True:
        state = (state * LCG_MUL + LCG_INC) & MASK64
        yield ((state >> WALK_SHIFT) * npages) >> WALK_SHIFT
