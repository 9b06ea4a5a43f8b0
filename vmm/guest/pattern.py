"""The memtouch data pattern and page walk, in Python: the one definition of their constants.

memtouch.py assembles the same arithmetic into the guest from these names; host-side checks
(tests, migration verification) compute what a page must hold from these functions.

The pattern is sampled. On this host guest code at CPL0 is emulated (kvm_pvm, see
shared/HOST.md): about 0.7 us per instruction, so a guest that wrote and checked all 512 qwords
of a page managed ~375 pages/s per vCPU. A page therefore carries the pattern in only SAMPLES
qwords, one every SAMPLE_STRIDE qwords (every 512 bytes), so every 512-byte part of every page
is still written by the fill and checked by every verify. For a page at global page frame number
``pfn`` and generation ``gen``:
    base    = mix(seed ^ (pfn * PFN_MUL))                      (splitmix64's finalizer)
    qword k = base ^ (k * QWORD_MUL) ^ (gen * GEN_MUL if j < HEAD_SAMPLES else 0)
              for the sampled k = j * SAMPLE_STRIDE, j = 0 .. SAMPLES - 1
Every other qword is never written by the fill nor checked (it stays as it is: zero on a fresh
page). A page copied to the wrong gpa, zeroed, or an old copy of a rewritten page still fails
verification (base depends on the pfn, sample 0 on the generation).
"""
from __future__ import annotations

import struct
from collections.abc import Iterator

from vmm.guest.layout import PAGE_SIZE, BootParams

MASK64 = (1 << 64) - 1
QWORDS_PER_PAGE = PAGE_SIZE // 8
SAMPLES = 8  # pattern qwords per page
SAMPLE_STRIDE = QWORDS_PER_PAGE // SAMPLES  # 64 qwords = 512 bytes between two samples
SAMPLE_QWORDS = tuple(j * SAMPLE_STRIDE for j in range(SAMPLES))  # the sampled qword indices
HEAD_SAMPLES = 1  # samples 0 .. HEAD_SAMPLES-1 carry the generation; the rewrite phase rewrites only these

PFN_MUL = 0x9E3779B97F4A7C15  # golden-ratio multiplier spreading pfns before the mix
MIX_SHIFT1, MIX_MUL1 = 30, 0xBF58476D1CE4E5B9  # splitmix64 finalizer, step 1
MIX_SHIFT2, MIX_MUL2 = 27, 0x94D049BB133111EB  # step 2
MIX_SHIFT3 = 31  # step 3
QWORD_MUL = 0xD6E8FEB86659FD93  # C2: makes every sample of a page differ
GEN_MUL = 0xA0761D6478BD642F  # C3: makes every generation of a page's head differ

# The page walk: a 64-bit LCG (Knuth's MMIX constants); the page index is the high 32 bits of
# the state scaled to the slice: ((state >> 32) * npages) >> 32.
LCG_MUL = 6364136223846793005
LCG_INC = 1442695040888963407
WALK_SEED_MUL = 0xE7037ED1A0B428DB  # walk state 0 = seed ^ ((vcpu + 1) * WALK_SEED_MUL)
WALK_SHIFT = 32

_PAGE = struct.Struct(f"<{QWORDS_PER_PAGE}Q")
_QWORD = struct.Struct("<Q")


def page_base(seed: int, pfn: int) -> int:
    x = (seed ^ (pfn * PFN_MUL)) & MASK64
    x = ((x ^ (x >> MIX_SHIFT1)) * MIX_MUL1) & MASK64
    x = ((x ^ (x >> MIX_SHIFT2)) * MIX_MUL2) & MASK64
    return x ^ (x >> MIX_SHIFT3)


def sample_offset(k: int) -> int:
    """k * QWORD_MUL mod 2**64: what sampled qword k is xored with besides base (and gen)."""
    return (k * QWORD_MUL) & MASK64


def sample_qwords(seed: int, pfn: int, gen: int) -> list[int]:
    """The SAMPLES pattern values of a page, in the order of SAMPLE_QWORDS."""
    base = page_base(seed, pfn)
    head = base ^ ((gen * GEN_MUL) & MASK64)
    return [(head if j < HEAD_SAMPLES else base) ^ sample_offset(k) for j, k in enumerate(SAMPLE_QWORDS)]


def page_qwords(seed: int, pfn: int, gen: int) -> list[int]:
    """The 512 qwords of a freshly filled page: the samples, zeros elsewhere."""
    qwords = [0] * QWORDS_PER_PAGE
    for k, value in zip(SAMPLE_QWORDS, sample_qwords(seed, pfn, gen)):
        qwords[k] = value
    return qwords


def page_words(seed: int, pfn: int, gen: int) -> bytes:
    """The 4096 bytes a freshly filled memtouch page at ``pfn`` holds at generation ``gen``."""
    return _PAGE.pack(*page_qwords(seed, pfn, gen))


def page_matches(data: bytes, seed: int, pfn: int, gen: int) -> bool:
    """Whether the 4096 bytes ``data`` pass the guest's check for ``pfn`` at ``gen`` (samples only)."""
    if len(data) != PAGE_SIZE:
        raise ValueError(f"a page is {PAGE_SIZE} bytes, not {len(data)}")
    return all(_QWORD.unpack_from(data, 8 * k)[0] == value
               for k, value in zip(SAMPLE_QWORDS, sample_qwords(seed, pfn, gen)))


def expected_page(params: BootParams, index: int, gen: int) -> bytes:
    """The bytes of page ``index`` of the slice ``params`` describes, freshly filled, at
    generation ``gen`` (only its samples are the pattern: compare with page_matches)."""
    if not 0 <= index < params.npages:
        raise IndexError(f"page {index} outside a slice of {params.npages} pages")
    return page_words(params.seed, params.first_pfn + index, gen)


def page_checksum(seed: int, pfn: int, gen: int) -> int:
    """What one intact page adds to a guest checksum: the sum of its samples mod 2**64."""
    return sum(sample_qwords(seed, pfn, gen)) & MASK64


def sweep_checksum(params: BootParams, gens: list[int]) -> int:
    """The checksum GS_SWEEP_DONE reports for an intact slice whose pages have ``gens``."""
    return sum(page_checksum(params.seed, params.first_pfn + i, g) for i, g in enumerate(gens)) & MASK64


def walk(seed: int, vcpu: int, npages: int) -> Iterator[int]:
    """The page indices vCPU ``vcpu``'s random walk visits, in order."""
    state = (seed ^ ((vcpu + 1) * WALK_SEED_MUL)) & MASK64
    while True:
        state = (state * LCG_MUL + LCG_INC) & MASK64
        yield ((state >> WALK_SHIFT) * npages) >> WALK_SHIFT
