"""Fault mode `exit`: each vCPU thread resolves its own missing-page exits.

uffd is opened with UFFD_FEATURE_SIGBUS, so nothing sleeps on the uffd wait queue: the vCPU's
KVM_RUN comes back (faults.py says how), this thread fetches the page and a readahead window
over its own connection, installs them with UFFDIO_COPY_MODE_DONTWAKE, completes the access
and re-enters the guest. A vCPU that scans (each fault where its last window ended) also sends
the request for the window after this one before it installs this one: the source builds and
sends it while this thread installs and the guest works through the current window, so the next
fault finds its answer already on the socket instead of waiting a round trip.
"""
from __future__ import annotations

import threading
from time import monotonic_ns

from postcopy.destination.client import SyncPageConnection
from postcopy.destination.install import Installer
from postcopy.destination.pages import PRESENT, Arrival, PageTracker
from postcopy.destination.readahead import Readahead
from postcopy.destination.retry import NoLongerWanted, RetryingSyncConnection
from postcopy.faults import MMIO, PAGE_MASK, FaultDecoder
from postcopy.observe.faultlog import FaultLog
from proto import PageRequest
from vmm.guest.layout import PAGE_SHIFT, PAGE_SIZE
from vmm.uffd import PageCopier
from vmm.vcpu import VcpuThread

DEMAND = Arrival.DEMAND  # an enum member read through its class costs a descriptor call


class VcpuFaultState:
    """What one vCPU thread keeps for its faults: decoder buffers, its connection, its window."""

    def __init__(self, decoder: FaultDecoder, connection: SyncPageConnection | None, readahead: Readahead) -> None:
        self.decoder = decoder
        self.connection = connection
        self.readahead = readahead
        self.ahead: PageRequest | None = None  # the window asked for ahead, answered next on connection
        self.ahead_page = 0
        self.waiting_page = -1  # the page this vCPU is fetching (its connection's retry asks)
        self.faults = FaultLog()  # fault exit to re-entry, one record per resolved fault
        self.copier: PageCopier | None = None  # this vCPU's one-page UFFDIO_COPY (set by prepare)


class ExitModeResolver:
    """The MemoryFaultHandler of every destination vCPU in exit mode."""

    def __init__(self, installer: Installer, *, readahead_base: int, readahead_max: int) -> None:
        self.installer = installer
        self.tracker: PageTracker = installer.tracker
        self.memory = installer.memory
        self.readahead_base = readahead_base
        self.readahead_max = readahead_max
        self.states: dict[int, VcpuFaultState] = {}
        self._gpa0 = self.memory.regions[0].gpa  # qword_offset's offsets are from here
        self._lock = threading.Lock()

    def prepare(self, thread: VcpuThread, connection: SyncPageConnection) -> None:
        """Attach to a vCPU before it starts, with the connection it will own (opened before
        the switchover, so not on the fault path)."""
        state = VcpuFaultState(FaultDecoder(self.memory), connection,
                               Readahead(self.readahead_base, self.readahead_max))
        state.copier = self.installer.page_copier()
        with self._lock:
            self.states[thread.id] = state
        if isinstance(connection, RetryingSyncConnection):
            connection.still_wanted = lambda: not self.tracker.is_present(state.waiting_page)
        thread.block_sigbus = True  # a patched kernel queues SIGBUS; we read it with sigtimedwait
        thread.fault_handler = self

    def on_fault_exit(self, thread: VcpuThread, ret: int) -> bool:
        # The hot path of this fault mode: one call per fault exit, nothing allocated per page,
        # and as few Python calls as the logic allows (at 2 vCPUs they run under one GIL).
        st = self.states[thread.id]
        t0 = monotonic_ns()  # the clock of the source's pause and of the timeline
        decoder = st.decoder
        offset = decoder.qword_offset(thread.vcpu) if ret == 0 else -1
        if offset >= 0:  # this host's usual fault: no Fault record filled and read back
            page = decoder.page_base + (offset >> PAGE_SHIFT)
            if self.tracker.state[page] != PRESENT:
                first = offset & PAGE_MASK
                self._resolve(st, page, self._gpa0 + first, decoder.hva_base + first)
            decoder.complete_qword(thread.vcpu, offset)
            st.faults.record(t0, MMIO, monotonic_ns() - t0)
            return True
        fault = decoder.decode(thread, ret)
        if fault is None:
            return False
        state = self.tracker.state
        page = fault.first_page
        if state[page] != PRESENT:
            self._resolve(st, page, fault.first_gpa, fault.first_hva)
        if fault.npages > 1:  # an access across pages
            for i in range(1, fault.npages):
                if state[page + i] != PRESENT:
                    self._resolve(st, page + i, fault.first_gpa + i * PAGE_SIZE, fault.first_hva + i * PAGE_SIZE)
        decoder.complete(thread, fault)
        st.faults.record(t0, fault.kind, monotonic_ns() - t0)
        return True

    def _resolve(self, st: VcpuFaultState, page: int, gpa: int, hva: int) -> None:
        """Make a missing ``page`` present: from the zero map, or fetched with its window."""
        tracker = self.tracker
        if tracker.zero_bitmap[page >> 3] >> (page & 7) & 1:  # tracker.is_zero, inlined
            self.installer.install_zero(page, 1)
            return
        st.waiting_page = page
        try:
            if st.readahead.max == 1 and st.ahead is None:  # one page a fault: no window to size
                self.installer.install_page(page, hva, st.connection.fetch(gpa, 1, "demand"), DEMAND,  # type: ignore[union-attr]
                                            st.copier)  # type: ignore[arg-type]
            else:
                self._fetch_window(st, page, gpa)
        except NoLongerWanted:
            # The source went away while this vCPU waited and the page came another way (the
            # retry checked that it is present): the fault is resolved all the same.
            pass

    def _fetch_window(self, st: VcpuFaultState, page: int, gpa: int) -> None:
        tracker = self.tracker
        window = st.readahead.window(page)
        ahead = st.ahead
        if ahead is not None:  # its answer comes first on this connection, whatever this fault is
            st.ahead = None
            batch = st.connection.receive(ahead)  # type: ignore[union-attr]
            reached = st.ahead_page == page
            if reached and st.readahead.scanning:
                self._send_ahead(st, page + ahead.count)  # before the install: the source works meanwhile
            self.installer.install_batch(batch, Arrival.READAHEAD)
            if tracker.is_present(page):
                if reached:
                    st.readahead.fetched(page, ahead.count)
                return
        extra = tracker.claim_readahead(page, window) if window > 1 else 0
        conn = st.connection
        try:
            if st.readahead.scanning and window > 1:  # this window's request, then the next one's
                request = conn.send(gpa, 1 + extra, "demand")  # type: ignore[union-attr]
                self._send_ahead(st, page + 1 + extra)
                batch = conn.receive(request)  # type: ignore[union-attr]
            else:
                batch = conn.fetch(gpa, 1 + extra, "demand")  # type: ignore[union-attr]
        except BaseException:
            st.ahead = None  # a connection that gave up forgets what it had in flight
            if extra:
                tracker.release(page + 1, extra)
            raise
        self.installer.install_batch(batch, Arrival.READAHEAD, first_how=Arrival.DEMAND)
        st.readahead.fetched(page, 1 + extra)

    def _send_ahead(self, st: VcpuFaultState, page: int) -> None:
        """Ask for the window that starts at ``page`` (the next fault's, if the scan goes on)."""
        n = self.tracker.ahead_run(page, st.readahead.next_window())
        if n:
            st.ahead = st.connection.send(self.memory.page_gpa(page), n, "readahead")  # type: ignore[union-attr]
            st.ahead_page = page

    def fault_logs(self) -> dict[int, FaultLog]:
        return {vcpu: st.faults for vcpu, st in self.states.items()}

    def close(self) -> None:
        for st in self.states.values():
            if st.connection is not None:
                st.connection.close()
                st.connection = None
