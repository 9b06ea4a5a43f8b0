"""The page tracker: claims, releases, arrival accounting and the zero map."""
from __future__ import annotations

from dataclasses import dataclass

from postcopy.destination.pages import IN_FLIGHT, MISSING, PRESENT, Arrival, PageTracker


@dataclass
class _Memory:
    pages: int


def test_counts_by_arrival_add_up_to_the_guest() -> None:
    t = PageTracker(_Memory(64))  # type: ignore[arg-type]
    assert t.mark_present(0, 4, Arrival.EAGER) == 4
    assert t.mark_present(2, 10, Arrival.BACKGROUND) == 8  # 2 and 3 were already there
    assert t.mark_present(12, 52, Arrival.DEMAND) == 52
    assert t.counts[Arrival.EAGER] == 4 and t.counts[Arrival.BACKGROUND] == 8
    assert sum(t.counts.values()) == 64 and t.all_present.is_set() and t.missing() == 0


def test_pages_created_without_the_lock_count_once_beside_counted_installs() -> None:
    t = PageTracker(_Memory(8))  # type: ignore[arg-type]
    t.mark_created(3, Arrival.DEMAND)  # a fault's own UFFDIO_COPY created page 3
    assert t.state[3] == PRESENT and t.present == 1 and t.counts[Arrival.DEMAND] == 1
    # A batch over 0..7 found page 3 existing (EEXIST): it created 7, and counts 7.
    assert t.mark_present(0, 8, Arrival.BACKGROUND, created=7) == 7
    assert t.counts == {**dict.fromkeys(Arrival, 0), Arrival.DEMAND: 1, Arrival.BACKGROUND: 7}
    assert t.all_present.is_set() and t.missing() == 0 and t.arrival[3] == Arrival.DEMAND


@dataclass
class _Maker:
    made: int = 0
    made_readahead: int = 0
    published: tuple[bytes, bool] | None = None

    def publish_zero_map(self, bitmap: bytes, known: bool) -> None:
        self.published = (bitmap, known)


def test_a_private_loops_pages_count_as_demand_and_readahead_and_it_is_told_of_the_zero_map() -> None:
    t = PageTracker(_Memory(16))  # type: ignore[arg-type]
    maker = _Maker(made=5, made_readahead=3)  # a loop made 2 faulting pages and 3 behind them
    t.makers.append(maker)
    assert t.counts[Arrival.DEMAND] == 2 and t.counts[Arrival.READAHEAD] == 3 and t.present == 5
    assert not t.zero_map_known  # the empty map it starts with is not the source's
    t.set_zero_map(b"\x01\x80")
    assert t.zero_map_known and t.is_zero(0) and t.is_zero(15) and not t.is_zero(1)
    assert maker.published == (b"\x01\x80", True)
    assert PageTracker(_Memory(16), bytes(2)).zero_map_known  # type: ignore[arg-type]


def test_the_last_page_created_without_the_lock_completes_the_guest() -> None:
    t = PageTracker(_Memory(4))  # type: ignore[arg-type]
    t.mark_present(0, 3, Arrival.EAGER)
    assert not t.all_present.is_set()
    t.mark_created(3, Arrival.DEMAND)
    assert t.all_present.is_set() and sum(t.counts.values()) == 4
    # Counts read in between only tally what was created since the last read.
    assert t.counts[Arrival.DEMAND] == 1 and t.present == 4


def test_claim_stops_at_pages_others_have_and_release_returns_them() -> None:
    t = PageTracker(_Memory(32))  # type: ignore[arg-type]
    t.mark_present(5, 1, Arrival.DEMAND)
    assert t.claim(0, 16) == 5
    assert t.state[:6] == bytes([IN_FLIGHT] * 5 + [PRESENT])
    assert t.claim(0, 4) == 0  # in flight already
    assert t.next_missing(0) == 6
    t.release(0, 5)
    assert t.state[:5] == bytes([MISSING] * 5)


def test_claim_does_not_mix_zero_and_data_pages() -> None:
    zero = bytes([0b11110000, 0, 0, 0])
    t = PageTracker(_Memory(32), zero)  # type: ignore[arg-type]
    assert t.claim(0, 32) == 4  # pages 0..3 are data, 4..7 zero
    assert t.is_zero(4) and not t.is_zero(3)
    assert t.claim(4, 32) == 4


def test_zero_runs_follow_the_bitmap_lsb_first() -> None:
    t = PageTracker(_Memory(40), bytes([0b10110001, 0xFF, 0xFF, 0, 1]))  # type: ignore[arg-type]
    assert list(t.zero_runs()) == [(0, 1), (4, 2), (7, 17), (32, 1)]
