"""The timeline of one migration as one JSON-able dict of compact arrays (no dict per fault),
the form in which a report (postcopy/report.py) or an API client gets it.

Times are in ms (faults: us) from time zero, ``clock`` says which instant that is:
"source_pause" (source and destination share a clock: same boot) or "switchover_request" (when
the destination asked the source to pause). Layout, version 1:

    version, clock, fault_mode, vcpus, npages
    marks_ms     {"switchover_request", "resume" (first KVM_RUN here), "complete"}: ms or None
    faults       {"kinds": [names], "t_us", "vcpu", "kind" (index into kinds), "latency_us"}, by time
    pages        {"t_ms", "eager", "demand", "readahead", "background", "zero"}: pages present so far
    blocktime_ms [per vCPU], blocktime_all_ms (time every vCPU was blocked at once, QEMU's total)
    progress     {"destination": {"t_ms", "verified"}, "source": {...} where the source gave one}
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from postcopy.observe.faultlog import FAULT_KINDS, FaultLog
from postcopy.observe.series import Series

TIMELINE_VERSION = 1


def build_timeline(*, origin_ns: int, clock: str, marks_ns: Mapping[str, int | None], fault_mode: str,
                   vcpus: int, npages: int, fault_logs: Mapping[int, FaultLog], pages: Series,
                   progress: Series) -> dict[str, Any]:
    records = sorted(
        (t, vcpu, kind, lat)
        for vcpu, fl in fault_logs.items()
        for t, kind, lat in zip(fl.t_ns[:len(fl)], fl.kind, fl.latency_ns))
    blocktime = [0.0] * vcpus
    for vcpu, fl in fault_logs.items():
        if 0 <= vcpu < vcpus:
            blocktime[vcpu] = round(fl.blocked_ns / 1e6, 3)
    return {
        "version": TIMELINE_VERSION,
        "clock": clock,
        "fault_mode": fault_mode,
        "vcpus": vcpus,
        "npages": npages,
        "marks_ms": {name: None if t is None else round((t - origin_ns) / 1e6, 3) for name, t in marks_ns.items()},
        "faults": {
            "kinds": list(FAULT_KINDS),
            "t_us": [(t - origin_ns) // 1000 for t, _, _, _ in records],
            "vcpu": [v for _, v, _, _ in records],
            "kind": [k for _, _, k, _ in records],
            "latency_us": [round(lat / 1e3, 1) for _, _, _, lat in records],
        },
        "pages": pages.as_dict(origin_ns),
        "blocktime_ms": blocktime,
        "blocktime_all_ms": round(all_blocked_ns(fault_logs, vcpus) / 1e6, 3),
        "progress": {"destination": progress.as_dict(origin_ns)},
    }


def all_blocked_ns(fault_logs: Mapping[int, FaultLog], vcpus: int) -> int:
    """How long every one of ``vcpus`` vCPUs waited for a page at the same time: a sweep over
    the start and end of every fault. A vCPU counts as waiting while any of its faults is open
    (in classic mode a vCPU woken early, by a signal, faults again on the same page)."""
    if vcpus < 1 or any(v not in fault_logs for v in range(vcpus)):
        return 0
    events = sorted(
        (t + lat * end, -1 if end else 1, v)
        for v, fl in fault_logs.items() if 0 <= v < vcpus
        for t, lat in zip(fl.t_ns[:len(fl)], fl.latency_ns)
        for end in (0, 1))
    depth = [0] * vcpus
    waiting, since, total = 0, 0, 0
    for t, delta, v in events:  # at equal times ends come first: touching faults do not overlap
        before = depth[v]
        depth[v] += delta
        if before == 0 and delta > 0:
            waiting += 1
            if waiting == vcpus:
                since = t
        elif before == 1 and delta < 0:
            if waiting == vcpus:
                total += t - since
            waiting -= 1
    return total
