"""Fault mode `exit`: each vCPU thread resolves its own missing-page exits.

uffd is opened with UFFD_FEATURE_SIGBUS, so nothing sleeps on the uffd wait queue: the vCPU's
KVM_RUN comes back (faults.py says how), this thread fetches the page and a readahead window
over its own connection, installs them with UFFDIO_COPY_MODE_DONTWAKE, completes the access
and re-enters the guest.
"""
from __future__ import annotations

import threading
from time import perf_counter_ns
from array import array

from postcopy.destination.client import SyncPageConnection
from postcopy.destination.install import Installer
from postcopy.destination.pages import Arrival, PageTracker
from postcopy.destination.readahead import Readahead
from postcopy.faults import FAULT_KIND_NAMES, FaultDecoder, FaultKind, complete
from vmm.guest.layout import PAGE_SIZE
from vmm.vcpu import VcpuThread


class VcpuFaultState:
    """What one vCPU thread keeps for its faults: decoder buffers, its connection, its window."""

    def __init__(self, decoder: FaultDecoder, connection: SyncPageConnection | None, readahead: Readahead) -> None:
        self.decoder = decoder
        self.connection = connection
        self.readahead = readahead
        self.kinds = [0] * len(FaultKind)
        self.latency_ns = array("Q")  # fault exit to re-entry, one per resolved fault
        self.blocked_ns = 0


class ExitModeResolver:
    """The MemoryFaultHandler of every destination vCPU in exit mode."""

    def __init__(self, installer: Installer, *, readahead_base: int, readahead_max: int) -> None:
        self.installer = installer
        self.tracker: PageTracker = installer.tracker
        self.memory = installer.memory
        self.readahead_base = readahead_base
        self.readahead_max = readahead_max
        self.states: dict[int, VcpuFaultState] = {}
        self._lock = threading.Lock()

    def prepare(self, thread: VcpuThread, connection: SyncPageConnection) -> None:
        """Attach to a vCPU before it starts, with the connection it will own (opened before
        the switchover, so not on the fault path)."""
        state = VcpuFaultState(FaultDecoder(self.memory), connection,
                               Readahead(self.readahead_base, self.readahead_max))
        with self._lock:
            self.states[thread.id] = state
        thread.block_sigbus = True  # a patched kernel queues SIGBUS; we read it with sigtimedwait
        thread.fault_handler = self

    def on_fault_exit(self, thread: VcpuThread, ret: int) -> bool:
        # The hot path of this fault mode: one call per fault exit, nothing allocated per page.
        st = self.states[thread.id]
        t0 = perf_counter_ns()
        fault = st.decoder.decode(thread, ret)
        if fault is None:
            return False
        tracker = self.tracker
        gpa, page = fault.first_gpa, fault.first_page
        if not tracker.is_present(page):
            self._resolve(st, page, gpa)
        if fault.npages > 1:  # an access across pages
            for i in range(1, fault.npages):
                if not tracker.is_present(page + i):
                    self._resolve(st, page + i, gpa + i * PAGE_SIZE)
        complete(thread, fault)
        st.kinds[fault.kind] += 1
        dt = perf_counter_ns() - t0
        st.latency_ns.append(dt)
        st.blocked_ns += dt
        return True

    def _resolve(self, st: VcpuFaultState, page: int, gpa: int) -> None:
        tracker = self.tracker
        if tracker.is_zero(page):
            self.installer.install_zero(page, 1)
            return
        window = st.readahead.window(page)
        extra = tracker.claim_readahead(page, window) if window > 1 else 0
        try:
            batch = st.connection.fetch(gpa, 1 + extra, "demand")  # type: ignore[union-attr]
        except BaseException:
            if extra:
                tracker.release(page + 1, extra)
            raise
        self.installer.install_batch(batch, Arrival.READAHEAD, first_how=Arrival.DEMAND)
        st.readahead.fetched(page, 1 + extra)

    def exit_kinds(self) -> dict[str, int]:
        totals = dict.fromkeys(FAULT_KIND_NAMES.values(), 0)
        for st in self.states.values():
            for kind, n in enumerate(st.kinds):
                totals[FAULT_KIND_NAMES[FaultKind(kind)]] += n
        return totals

    def latencies_ns(self) -> list[int]:
        return [x for st in self.states.values() for x in st.latency_ns]

    def blocktime_ns(self) -> dict[int, int]:
        return {vcpu: st.blocked_ns for vcpu, st in self.states.items()}

    def close(self) -> None:
        for st in self.states.values():
            if st.connection is not None:
                st.connection.close()
                st.connection = None
