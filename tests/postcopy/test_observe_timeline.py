"""Fault logs, sampled series and the timeline's arithmetic, on records made up here."""
from __future__ import annotations

import asyncio

import pytest

from postcopy.faults import FaultKind
from postcopy.observe.faultlog import (
    CLASSIC_KINDS,
    EXIT_KINDS,
    FAULT_KINDS,
    UFFD_KIND,
    FaultLog,
    blocktime_ns,
    kind_totals,
    latencies_ns,
)
from postcopy.observe.series import Sampler, Series
from postcopy.observe.timeline import all_blocked_ns, build_timeline


def _log(*records: tuple[int, int, int]) -> FaultLog:
    fl = FaultLog()
    for t, kind, lat in records:
        fl.record(t, kind, lat)
    return fl


def test_fault_log_counts_kinds_and_sums_blocktime() -> None:
    fl = _log((100, FaultKind.MMIO, 10), (200, FaultKind.FETCH, 5), (300, FaultKind.MMIO, 7))
    assert len(fl) == 3 and fl.blocked_ns == 22
    assert kind_totals([fl], EXIT_KINDS) == {"mmio": 2, "fetch": 1, "memory_fault": 0, "sigbus": 0}
    assert kind_totals([fl], CLASSIC_KINDS) == {"uffd": 0}
    assert FAULT_KINDS[UFFD_KIND] == "uffd"
    assert sorted(latencies_ns([fl, _log((1, UFFD_KIND, 3))])) == [3, 5, 7, 10]


def test_blocktime_leaves_out_faults_of_unknown_threads() -> None:
    logs = {0: _log((0, 0, 4)), 1: _log((0, 0, 6)), -1: _log((0, UFFD_KIND, 100))}
    assert blocktime_ns(logs) == {0: 4, 1: 6}


def test_all_blocked_counts_only_time_every_vcpu_waits() -> None:
    # vCPU 0 waits [0, 10) and [20, 30); vCPU 1 waits [5, 25): all wait in [5, 10) and [20, 25).
    logs = {0: _log((0, 0, 10), (20, 0, 10)), 1: _log((5, 0, 20))}
    assert all_blocked_ns(logs, 2) == 10
    assert all_blocked_ns(logs, 3) == 0  # a vCPU that never faulted never waited
    assert all_blocked_ns({0: _log((0, 0, 10), (20, 0, 10))}, 1) == 20
    # One vCPU waiting twice at once (woken early, faulted again) is still one vCPU waiting.
    assert all_blocked_ns({0: _log((0, 0, 10), (5, 0, 10)), 1: _log((100, 0, 1))}, 2) == 0
    assert all_blocked_ns({0: _log((5, 0, 10), (0, 0, 10)), 1: _log((0, 0, 30))}, 2) == 15


def test_series_drops_its_oldest_half_when_full_and_reports_relative_times() -> None:
    s = Series(["a", "b"], limit=4)
    for i in range(5):
        s.add(1_000_000 * i, (i, 10 * i))
    d = s.as_dict(origin_ns=2_000_000)
    assert d == {"t_ms": [0.0, 1.0, 2.0], "a": [2, 3, 4], "b": [20, 30, 40]}
    with pytest.raises(ValueError, match="takes 2 values"):
        s.add(0, (1,))


def test_sampler_samples_until_stopped_and_once_more_at_stop() -> None:
    seen: list[int] = []

    async def main() -> None:
        sampler = Sampler(0.001, seen.append)
        sampler.start()
        await asyncio.sleep(0.03)
        await sampler.stop()
        n = len(seen)
        await asyncio.sleep(0.01)
        assert len(seen) == n  # stopped for good
    asyncio.run(main())
    assert len(seen) >= 3 and seen == sorted(seen)


def test_a_cancelled_sampler_takes_no_sample_more_not_even_a_last_one() -> None:
    seen: list[int] = []

    async def main() -> None:
        sampler = Sampler(0.001, seen.append)
        sampler.start()
        await asyncio.sleep(0.01)
        n = len(seen)
        sampler.cancel()  # no await: it stops before the loop runs again
        assert len(seen) == n
        await asyncio.sleep(0.01)
        assert len(seen) == n
        sampler.cancel()  # again: nothing to do
    asyncio.run(main())
    assert seen


def test_timeline_sorts_faults_by_time_and_is_relative_to_its_origin() -> None:
    logs = {0: _log((5_000_000, 0, 2000)), 1: _log((3_000_000, 1, 1000))}
    pages, progress = Series(["eager", "demand"]), Series(["verified"])
    pages.add(4_000_000, (3, 1))
    progress.add(4_000_000, (7,))
    tl = build_timeline(origin_ns=1_000_000, clock="source_pause", marks_ns={"resume": 2_000_000, "complete": None},
                        fault_mode="exit", vcpus=2, npages=16, fault_logs=logs, pages=pages, progress=progress)
    assert tl["faults"]["t_us"] == [2000, 4000] and tl["faults"]["vcpu"] == [1, 0]
    assert tl["faults"]["kind"] == [1, 0] and tl["faults"]["latency_us"] == [1.0, 2.0]
    assert tl["marks_ms"] == {"resume": 1.0, "complete": None}
    assert tl["pages"] == {"t_ms": [3.0], "eager": [3], "demand": [1]}
    assert tl["blocktime_ms"] == [0.002, 0.001]
    assert tl["progress"]["destination"] == {"t_ms": [3.0], "verified": [7]}


def test_series_cut_after_drops_the_samples_past_an_instant() -> None:
    s = Series(["a"])
    for i in range(5):
        s.add(i * 10, (i,))
    s.cut_after(25)
    assert s.as_dict(0)["a"] == [0, 1, 2] and len(s) == 3
