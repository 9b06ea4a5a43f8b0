"""Per-vCPU fault records: each fault's time, kind and latency, appended by the one thread that
owns the log (no lock, no per-fault object), read by anyone between appends (the GIL keeps an
array append whole)."""
from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping

from postcopy.faults import FAULT_KIND_NAMES, FaultKind

# Exit kinds of fault mode `exit`, then `uffd`: a fault read from the userfaultfd (classic).
FAULT_KINDS: tuple[str, ...] = (*FAULT_KIND_NAMES.values(), "uffd")
UFFD_KIND = len(FaultKind)
EXIT_KINDS = range(len(FaultKind))
CLASSIC_KINDS = range(UFFD_KIND, UFFD_KIND + 1)
# The appends are on the fault path. CPython 3.11 converts an array item of typecode "L"
# (unsigned long: 64 bits on Linux) directly, but one of "q" or "B" through PyArg_Parse: 27
# against 67 ns an append here, and a bytearray's 19 against 43 for the kind.
U64 = "L"
assert array(U64).itemsize == 8


class FaultLog:
    """One vCPU's faults. ``record`` is the whole hot-path cost: three appends, no more than
    the counters it replaced (totals are summed by readers, in C, from the arrays).

    One writer per log: the three appends of a record are not atomic together. Where several
    threads serve one vCPU's faults (classic handlers on several CPUs), give each thread its
    own logs and merge them when read."""

    __slots__ = ("t_ns", "kind", "latency_ns")

    def __init__(self) -> None:
        self.t_ns = array(U64)  # CLOCK_MONOTONIC when the fault reached us
        self.kind = bytearray()  # index into FAULT_KINDS
        self.latency_ns = array(U64)  # until the vCPU could go on (re-entry, or the uffd wake)

    def record(self, t_ns: int, kind: int, latency_ns: int) -> None:
        self.t_ns.append(t_ns)
        self.kind.append(kind)
        self.latency_ns.append(latency_ns)

    def __len__(self) -> int:
        # The latency goes in last: a reader between appends sees only whole records.
        return len(self.latency_ns)

    def head(self, n: int) -> FaultLog:
        """A copy of the first ``n`` records."""
        copy = FaultLog()
        copy.t_ns.extend(self.t_ns[:n])
        copy.kind.extend(self.kind[:n])
        copy.latency_ns.extend(self.latency_ns[:n])
        return copy

    def count(self, kind: int) -> int:
        return self.kind[:len(self)].count(kind)

    @property
    def blocked_ns(self) -> int:
        """This vCPU's post-copy blocktime: the sum of its faults' latencies."""
        return sum(self.latency_ns)


def kind_totals(logs: Iterable[FaultLog], kinds: range) -> dict[str, int]:
    """Fault counts by kind name over ``logs``, for the kinds a fault mode can produce."""
    totals = dict.fromkeys((FAULT_KINDS[k] for k in kinds), 0)
    for fl in logs:
        for k in kinds:
            totals[FAULT_KINDS[k]] += fl.count(k)
    return totals


def latencies_ns(logs: Iterable[FaultLog]) -> list[int]:
    return [x for fl in logs for x in fl.latency_ns]


def blocktime_ns(logs: Mapping[int, FaultLog]) -> dict[int, int]:
    """Time each vCPU spent waiting for pages (vCPU -1, faults of unknown threads, left out)."""
    return {vcpu: fl.blocked_ns for vcpu, fl in sorted(logs.items()) if vcpu >= 0}


def merge_logs(per_thread: Iterable[Mapping[int, FaultLog]], vcpus: Iterable[int] = ()) -> dict[int, FaultLog]:
    """One log per vCPU from the logs several threads kept for it (classic handler threads),
    each read up to its last whole record; ``vcpus`` get a log even if they never faulted."""
    merged = {vcpu: FaultLog() for vcpu in vcpus}
    for logs in per_thread:
        for vcpu, fl in list(logs.items()):  # a copy: the writer may add a vCPU meanwhile
            n = len(fl)
            into = merged.setdefault(vcpu, FaultLog())
            into.t_ns.extend(fl.t_ns[:n])
            into.kind.extend(fl.kind[:n])
            into.latency_ns.extend(fl.latency_ns[:n])
    return merged
