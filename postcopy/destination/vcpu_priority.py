"""The vCPU threads' priority while memory is missing: they yield the CPU to the transfer.

Every page still missing is a fault to come, and the source must stay up until the last one, so
a destination that shares its CPUs with a busy guest runs the guest's vCPU threads at
POSTCOPY_VCPU_NICE until every page is present, then sets them back. Measured side by side on
this 2-core host (docs/performance.md), a busy 2-vCPU guest with 767 MiB of 1 GiB written:
0.80-1.08 s to completion at nice 0, 0.53-0.56 s at 10, the guest's CPU time meanwhile 0.7-1.0
-> ~0.2 s. A vCPU that exits on a missing page fetches it at its own priority, since that
fetch is the transfer's most urgent work (exit mode, GuestNice.urgent): in a 256 MiB demo-like
migration the faults' p99 went from 7.4-10.7 ms back to 2.9-4.8 (3.1-4.2 at nice 0), and the
vCPUs waited 176-203 ms in all against 240-287 at nice 0. An operator picks another value per
migration (`vcpu_nice`; 0 leaves them alone). The threads are lowered just after the resume
(their first KVM_RUNs are downtime), so a fetch already under way then finishes at the lower
nice: one per vCPU at most.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from vmm.priority import MAX_NICE, GuestNice, may_set_nice, thread_nice
from vmm.vcpu import VcpuThread

log = logging.getLogger("postcopy.destination")
POSTCOPY_VCPU_NICE = 10


class VcpuPriority:
    def __init__(self, nice: int) -> None:
        if not 0 <= nice <= MAX_NICE:
            raise ValueError(f"vcpu_nice must be 0 to {MAX_NICE}, not {nice}")
        self.nice = nice
        self.applied = 0  # the nice value the vCPUs got, 0 if they were left alone (the report's)
        self._threads: list[VcpuThread] = []  # the ones reniced

    def lower(self, threads: Iterable[VcpuThread], migration_id: str | None = None) -> None:
        """Run the vCPU threads' guest code at ``nice`` (vmm.priority.GuestNice: a fault is
        resolved at their own), where this process may set them back; else leave them, and
        say so."""
        if not self.nice:
            return
        for thread in threads:
            if not thread.tid or not thread.alive:
                continue
            try:
                before = thread_nice(thread.tid)
                if before >= self.nice:
                    continue
                if not may_set_nice(before):
                    log.info("vCPU threads keep their priority during post-copy: this process could not "
                             "set it back to %d (needs CAP_SYS_NICE or RLIMIT_NICE)", before,
                             extra={"event": "vcpu_priority_kept", "migration_id": migration_id})
                    return
                thread.guest_nice = GuestNice(thread.tid, before, self.nice)
            except ProcessLookupError:  # the thread ended meanwhile
                continue
            self._threads.append(thread)
            self.applied = self.nice

    def restore(self) -> None:
        for thread in self._threads:
            guest_nice, thread.guest_nice = thread.guest_nice, None
            if guest_nice is None:
                continue
            try:
                guest_nice.end()
            except ProcessLookupError:  # stopped meanwhile
                pass
            except PermissionError as e:  # may_set_nice said yes: our limits changed since
                log.warning("cannot set vCPU thread %d back to nice %d: %s", thread.tid, guest_nice.base, e)
        self._threads.clear()
