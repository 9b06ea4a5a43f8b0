"""Readahead windows: doubling while a vCPU scans, back to the base off the scan, and aligned
(each ends on a multiple of its size), so that a scan's largest windows are whole huge pages."""
from __future__ import annotations

from postcopy.destination.readahead import DEFAULT_MAX, Readahead


def _scan(ra: Readahead, page: int, faults: int) -> list[tuple[int, int]]:
    """(page, window) of ``faults`` faults, each where the last window ended."""
    out = []
    for _ in range(faults):
        n = ra.window(page)
        out.append((page, n))
        ra.fetched(page, n)
        page += n
    return out


def test_a_scan_doubles_its_window_and_every_window_ends_on_a_multiple_of_its_size() -> None:
    windows = _scan(Readahead(4, 64), 3, 9)
    assert windows == [(3, 1), (4, 4), (8, 8), (16, 16), (32, 32), (64, 64), (128, 64), (192, 64), (256, 64)]
    ra = Readahead()
    assert ra.max == DEFAULT_MAX == 512  # one 2 MiB huge page
    last = _scan(ra, 1000, 12)[-3:]
    assert all(n == 512 and page % 512 == 0 for page, n in last)


def test_a_fault_off_the_scan_starts_again_from_the_base() -> None:
    ra = Readahead(4, 64)
    _scan(ra, 0, 5)
    assert ra.window(1001) == 3 and not ra.scanning  # base 4, ending at 1004


def test_the_window_asked_for_ahead_is_aligned_as_the_next_fault_would_get_it() -> None:
    ra = Readahead(4, 512)
    _scan(ra, 0, 3)  # windows of 4, 8, 16: the next one starts at 28 with size 32
    assert ra.next_window(28) == 4 and ra.next_window(32) == 32
