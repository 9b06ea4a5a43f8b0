"""Fault mode `exit`: each vCPU thread resolves its own missing-page exits.

uffd is opened with UFFD_FEATURE_SIGBUS, so nothing sleeps on the uffd wait queue: the vCPU's
KVM_RUN comes back (faults.py says how), this thread fetches the page and a readahead window
over its own connection, installs them with UFFDIO_COPY_MODE_DONTWAKE, completes the access
and re-enters the guest. The vCPU runs this mode's own KVM_RUN loop (``_run``), which takes
this host's usual fault itself and hands everything else to the vCPU thread's general handling.
A vCPU that scans (each fault where its last window ended) hands the rest of its scan to its
prefetcher (prefetch.py), which fetches and installs the next windows while the guest walks
this one: the guest then meets installed pages and does not exit, and a fault on a window the
prefetcher has in flight waits for it instead of fetching it again. Where a fault takes one
page (no readahead), the vCPU's loop runs in a Python interpreter of its own instead, under a
GIL of its own (private_loop.py), and comes back here for everything else.
"""
from __future__ import annotations

import fcntl
import logging
import threading
from time import monotonic_ns

from postcopy.destination import private_loop
from postcopy.destination.classic_mode import cpu_beside
from postcopy.destination.client import SyncPageConnection
from postcopy.destination.install import Installer
from postcopy.destination.pages import IN_FLIGHT, PRESENT, Arrival, PageTracker
from postcopy.destination.prefetch import Prefetcher
from postcopy.destination.readahead import Readahead
from postcopy.destination.retry import NoLongerWanted, RetryingSyncConnection
from postcopy.faults import MMIO, PAGE_MASK, FaultDecoder
from postcopy.observe.faultlog import FaultLog
from vmm.abi import kvm as kvm_abi
from vmm.guest.layout import PAGE_SHIFT, PAGE_SIZE
from vmm.kvm import EXIT_REASON_U32, MMIO_DATA_U64, MMIO_IS_WRITE_U8, MMIO_LEN_U32, MMIO_PHYS_ADDR_U64
from vmm.priority import GuestNice
from vmm.uffd import PageCopier, UffdError
from vmm.vcpu import KVM_EXIT_MMIO, VcpuState, VcpuThread

log = logging.getLogger("postcopy.destination")
DEMAND = Arrival.DEMAND  # an enum member read through its class costs a descriptor call
# How long a vCPU thread polls for its page before it sleeps in recv (websocket._poll_into).
FETCH_POLL_NS = 200_000


def fetch_poll_ns(vcpus: int) -> int:
    """The polling a VM's vCPU connections get: only a VM's single vCPU thread polls. With
    several, the polling thread takes back the GIL between its tries before a thread that
    waits for it wakes up (a wake-up across CPUs), and the others' faults wait up to the
    switch interval: at 2 vCPUs polling made fetch p50 and p99 worse (docs/perf/journal.md, fetch)."""
    return FETCH_POLL_NS if vcpus == 1 else 0


class VcpuFaultState:
    """What one vCPU thread keeps for its faults: decoder buffers, its connection, its window."""

    def __init__(self, decoder: FaultDecoder, connection: SyncPageConnection | None, readahead: Readahead) -> None:
        self.decoder = decoder
        self.connection = connection
        self.readahead = readahead
        self.prefetcher: Prefetcher | None = None  # where readahead is on and it has a connection
        self.waiting_page = -1  # the page this vCPU is fetching (its connection's retry asks)
        self.faults = FaultLog()  # fault exit to re-entry, one record per resolved fault
        self.copier: PageCopier | None = None  # this vCPU's one-page UFFDIO_COPY (set by prepare)
        self.private: private_loop.PrivateLoop | None = None  # its fault loop in a private interpreter, if it has one


class ExitModeResolver:
    """The MemoryFaultHandler of every destination vCPU in exit mode."""

    def __init__(self, installer: Installer, *, readahead_base: int, readahead_max: int,
                 private_loops: bool = True) -> None:
        self.installer = installer
        self.tracker: PageTracker = installer.tracker
        self.memory = installer.memory
        self.readahead_base = readahead_base
        self.readahead_max = readahead_max
        self.states: dict[int, VcpuFaultState] = {}
        self._lock = threading.Lock()
        # One page a fault is taken in a private interpreter per vCPU where one can be had
        # (private_loop.py); False keeps every vCPU's loop under this interpreter's GIL.
        self.private_loops = private_loops and private_loop.unavailable() is None

    def prepare(self, thread: VcpuThread, connection: SyncPageConnection,
                prefetch: RetryingSyncConnection | None = None) -> None:
        """Attach to a vCPU before it starts, with the connection it will own and its
        prefetcher's (opened before the switchover, so not on the fault path; without readahead
        no prefetcher starts and ``prefetch`` is closed)."""
        state = VcpuFaultState(FaultDecoder(self.memory), connection,
                               Readahead(self.readahead_base, self.readahead_max))
        state.copier = self.installer.page_copier()
        if prefetch is not None and self.readahead_max > 1:
            state.prefetcher = Prefetcher(self.installer, prefetch, window_max=self.readahead_max,
                                          name=f"prefetch-{thread.id}", cpu=cpu_beside(thread.cpu))
        elif prefetch is not None:
            prefetch.close()
        with self._lock:
            self.states[thread.id] = state
        thread.fault_state = state
        if isinstance(connection, RetryingSyncConnection):
            connection.still_wanted = lambda: not self.tracker.is_present(state.waiting_page)
        thread.block_sigbus = True  # a patched kernel queues SIGBUS; we read it with sigtimedwait
        thread.fault_handler = self
        state.private = self._private_loop(thread, state)
        thread.run_loop = state.private.run if state.private is not None else lambda: self._run(thread)

    def _private_loop(self, thread: VcpuThread, state: VcpuFaultState) -> private_loop.PrivateLoop | None:
        """A fault loop in a private interpreter for this vCPU (private_loop.py), where it
        fetches from a connection it can read itself, RAM is one region and an interpreter is
        free (before the switchover; the destination loads them beforehand off its event loop,
        private_loop.warm); else None."""
        if not self.private_loops or state.connection is None:
            return None
        if state.decoder.qword_span()[1] == 0 or not private_loop.can_read(state.connection):
            return None
        return private_loop.start(lambda private: private_loop.PrivateLoop(self, thread, state, private),
                                  f"vCPU {thread.id}", thread.cpu)

    def _run(self, thread: VcpuThread) -> VcpuState:
        """The vCPU's KVM_RUN loop (VcpuThread.run_loop). This host's usual fault, an MMIO exit
        for an aligned 8-byte access inside single-region RAM, is taken here; with one page a
        fault (no readahead), and the guest at the thread's own priority, it is resolved in
        this frame, the fetch and the UFFDIO_COPY its only Python calls. At 2 vCPUs both
        threads run their Python under one GIL and write the reference counts of every
        function they call and object they load from both CPUs: side by side, this loop
        against one that called a function per piece (decode, resolve, install, mark,
        complete, record) paged in 4-15% faster at 2 vCPUs, 5% at 1. So four pieces are
        inlined, each marked with its original, which keeps serving the general path. Every
        other exit goes to the thread's general handling (handle_exit), a fault among them to
        on_fault_exit."""
        st: VcpuFaultState = thread.fault_state  # type: ignore[assignment]
        vcpu, decoder, faults = thread.vcpu, st.decoder, st.faults
        u8, u32, u64 = vcpu.run_u8, vcpu.run_u32, vcpu.run_u64
        lo, qword_end, ram = decoder.qword_span()
        page_base, hva_base = decoder.page_base, decoder.hva_base
        fd, ioctl, KVM_RUN = vcpu.fd, fcntl.ioctl, kvm_abi.KVM_RUN
        tracker = self.tracker
        state, arrival, created = tracker.state, tracker.arrival, tracker.created
        npages, all_present = tracker.npages, tracker.all_present
        one_page = st.readahead.max == 1 and st.connection is not None
        fetch_page = st.connection.fetch_page if one_page else None  # type: ignore[union-attr]
        copier, install_page, resolve = st.copier, self.installer.install_page, self._resolve
        copy = copier.copy  # type: ignore[union-attr]
        log_t, log_kind, log_latency = faults.t_ns.append, faults.kind.append, faults.latency_ns.append
        handle, counts = thread.handle_exit, thread.exit_counts
        taken = 0  # exits taken here since they were last added to the thread's exit counts
        try:
            while True:
                try:  # Vcpu.run, inlined
                    ioctl(fd, KVM_RUN)
                    ret = 0
                except OSError as e:
                    ret = -e.errno
                # FaultDecoder.qword_offset, inlined
                if not ret and u32[EXIT_REASON_U32] == KVM_EXIT_MMIO and u32[MMIO_LEN_U32] == 8:
                    t0 = monotonic_ns()  # the clock of the source's pause and of the timeline
                    offset = u64[MMIO_PHYS_ADDR_U64] - lo
                    if not offset & 7 and 0 <= offset < qword_end:
                        taken += 1
                        page = page_base + (offset >> PAGE_SHIFT)
                        if state[page] != PRESENT:
                            first = offset & PAGE_MASK
                            # _resolve's one-page fetch, inlined
                            # (the zero map read at each fault: the source's arrives after the resume)
                            if (one_page and not tracker.zero_bitmap[page >> 3] >> (page & 7) & 1
                                    and thread.guest_nice is None):
                                st.waiting_page = page
                                try:
                                    data = fetch_page(lo + first)  # type: ignore[misc]
                                    # Installer.install_page for one data page, inlined; anything
                                    # else (a zero page's batch, a failed copy) goes to it whole
                                    made = -1
                                    if type(data) is int:
                                        try:
                                            made = copy(hva_base + first, data)  # 0: EEXIST, counted by its maker
                                        except UffdError:
                                            pass  # install_page tries again and says what it is
                                    if made < 0:
                                        install_page(page, hva_base + first, data, DEMAND, copier)  # type: ignore[arg-type]
                                    elif made:  # PageTracker.mark_created, inlined
                                        state[page] = PRESENT
                                        arrival[page] = DEMAND
                                        created.append(DEMAND)
                                        if len(created) + tracker.counted == npages:
                                            all_present.set()
                                except NoLongerWanted:
                                    pass  # as _resolve: the page came another way
                            else:
                                resolve(st, page, lo + first, hva_base + first, thread.guest_nice)
                        # FaultDecoder.complete_qword, inlined
                        if u8[MMIO_IS_WRITE_U8]:
                            ram[offset >> 3] = u64[MMIO_DATA_U64]  # type: ignore[index]
                        else:
                            u64[MMIO_DATA_U64] = ram[offset >> 3]  # type: ignore[index]
                        # FaultLog.record, inlined (the latency last: readers see whole records)
                        log_t(t0)
                        log_kind(MMIO)
                        log_latency(monotonic_ns() - t0)
                        continue
                if taken:
                    counts[KVM_EXIT_MMIO] = counts.get(KVM_EXIT_MMIO, 0) + taken
                    taken = 0
                final = handle(ret)
                if final is not None:
                    return final
        finally:
            if taken:
                counts[KVM_EXIT_MMIO] = counts.get(KVM_EXIT_MMIO, 0) + taken

    def on_fault_exit(self, thread: VcpuThread, ret: int) -> bool:
        """Any fault exit (the MemoryFaultHandler of the vCPU threads): the ones _run does not
        take itself (a queued SIGBUS, an instruction fetch, an access of another size or
        across pages, RAM in several regions), or all of them where _run is not the loop."""
        st: VcpuFaultState = thread.fault_state  # type: ignore[assignment]
        t0 = monotonic_ns()
        decoder = st.decoder
        fault = decoder.decode(thread, ret)
        if fault is None:
            return False
        state = self.tracker.state
        page = fault.first_page
        if state[page] != PRESENT:
            self._resolve(st, page, fault.first_gpa, fault.first_hva, thread.guest_nice)
        if fault.npages > 1:  # an access across pages
            for i in range(1, fault.npages):
                if state[page + i] != PRESENT:
                    self._resolve(st, page + i, fault.first_gpa + i * PAGE_SIZE, fault.first_hva + i * PAGE_SIZE,
                                  thread.guest_nice)
        decoder.complete(thread, fault)
        st.faults.record(t0, fault.kind, monotonic_ns() - t0)
        return True

    def _resolve(self, st: VcpuFaultState, page: int, gpa: int, hva: int, guest_nice: GuestNice | None = None) -> None:
        """Make a missing ``page`` present: from the zero map, or fetched with its window. Where
        the guest runs at a lower priority (``guest_nice``: VcpuThread.guest_nice), the fetch is
        made at the thread's own: the page it brings is the transfer's most urgent work."""
        tracker = self.tracker
        if tracker.zero_bitmap[page >> 3] >> (page & 7) & 1:  # tracker.is_zero, inlined
            self.installer.install_zero(page, 1)
            return
        st.waiting_page = page
        if guest_nice is not None:
            guest_nice.urgent()
        try:
            if st.readahead.max == 1:  # one page a fault: no window to size
                self.installer.install_page(page, hva, st.connection.fetch_page(gpa), DEMAND,  # type: ignore[union-attr]
                                            st.copier)  # type: ignore[arg-type]
            else:
                self._fetch_window(st, page, gpa)
        except NoLongerWanted:
            # The source went away while this vCPU waited and the page came another way (the
            # retry checked that it is present): the fault is resolved all the same.
            pass
        finally:
            if guest_nice is not None:
                guest_nice.relax()

    def _fetch_window(self, st: VcpuFaultState, page: int, gpa: int) -> None:
        tracker = self.tracker
        prefetcher = st.prefetcher
        if prefetcher is not None and prefetcher.reached(page):
            if tracker.state[page] == IN_FLIGHT and prefetcher.wait(page):
                prefetcher.follow(page)  # the guest outran it: keep it ahead of this fault
                return
            st.readahead.next_expected = page  # where the scan is: it goes on from here
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
        if prefetcher is not None and st.readahead.scanning:
            prefetcher.follow(page + 1 + extra)

    def flush_private_loops(self, timeout: float = 1.0) -> None:
        """Bring the fault records the private loops hold into the vCPUs' FaultLogs, for a
        report that counts every fault (each vCPU kicked out of KVM_RUN once, where its loop
        holds some: the loop returns, flushes and goes on)."""
        for vcpu, st in self.states.items():
            private = st.private
            if private is not None and not private.flush_from_outside(private.thread.kick, timeout):
                log.warning("vCPU %d's private loop did not hand its fault records back within %.1f s: "
                            "the report may miss some of its faults", vcpu, timeout)

    def private_loop_count(self) -> int:
        """How many of the vCPUs run their fault loop in a private interpreter."""
        return sum(st.private is not None for st in self.states.values())

    def fault_logs(self) -> dict[int, FaultLog]:
        return {vcpu: st.faults for vcpu, st in self.states.items()}

    def close(self) -> None:
        for st in self.states.values():
            if st.private is not None and not st.private.started:
                st.private.release()  # never entered: its thread will not give it back
            if st.prefetcher is not None:
                st.prefetcher.close()
            if st.connection is not None:
                st.connection.close()
                st.connection = None
