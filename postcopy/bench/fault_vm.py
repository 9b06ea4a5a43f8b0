"""A destination VM whose vCPUs fault on every data page, for the fetch section: the `touch`
guest (each vCPU reads one qword of every page of its slice, in order, once) on empty,
userfaultfd-registered RAM whose pages come from a paused source's page server.

Only the boot region (page tables, GDT, IDT, code, stacks: below DATA_GPA) is written here,
before RAM is registered; every data page is then missing and resolved by the real exit-mode
path (ExitModeResolver: fault exit -> fetch over the vCPU's own connection -> UFFDIO_COPY ->
complete the access -> re-enter), which also records each fault's exit-to-re-entry time.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from postcopy.destination.client import SyncPageConnection
from postcopy.destination.retry import RetryContext, RetryingSyncConnection
from postcopy.observe.faultlog import latencies_ns
from postcopy.destination.classic_mode import place_vcpus
from postcopy.destination.exit_mode import ExitModeResolver, fetch_poll_ns
from postcopy.destination.install import Installer
from postcopy.destination.migration import SWITCH_INTERVAL_S
from postcopy.destination.pages import Arrival, PageTracker
from proto import MigrationHeader
from vmm.abi.userfaultfd import UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_SIGBUS
from vmm.guest import workloads
from vmm.guest.layout import DATA_GPA, PAGE_SIZE
from vmm.machine import Machine, MachineConfig
from vmm.memory import GuestMemory
from vmm.uffd import Uffd

RUN_TIMEOUT_S = 120.0
POLL_S = 0.05  # how often the wait for the guest looks at the vCPUs


class FaultVmError(Exception):
    """The touch guest did not finish cleanly; the message says why."""


@dataclass(slots=True)
class ScanResult:
    vcpus: int
    pages: int  # data pages the guest touched
    seconds: float  # vCPUs started -> last GS_DONE
    latency_ns: list[int]  # one per resolved fault exit
    fetches: int  # requests sent

    @property
    def pages_s(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0


def scan(header: MigrationHeader, zero_bitmap: bytes, url: str, token: str, vcpus: int, *,
         readahead_base: int, readahead_max: int, poll: bool = True,
         inspect: Callable[[ExitModeResolver, GuestMemory], None] | None = None) -> ScanResult:
    """Run the touch guest once over a fresh destination VM; every data page is fetched from
    ``url`` (zero-map pages are made here, as in a migration), the vCPUs placed and their
    connections polling as the destination's (``poll`` False: none polls, for comparison).
    ``inspect`` (tests) sees the resolver and guest RAM once the guest is done, before anything
    is closed."""
    layout = [(r.gpa, r.size) for r in header.regions]
    size = sum(r.size for r in header.regions)
    memory = GuestMemory.create_layout(layout, "anon", "bench-fault-vm")
    machine: Machine | None = None
    uffd: Uffd | None = None
    resolver: ExitModeResolver | None = None
    connections: list[RetryingSyncConnection] = []
    sockets: list[SyncPageConnection] = []
    old_interval = sys.getswitchinterval()
    try:
        machine = Machine.create(MachineConfig(size, vcpus), memory=memory)
        place_vcpus(machine.vcpus)  # as the destination places them
        program, params = workloads.plan("touch", size, vcpus, seed=1)
        memory.write(0, bytes(DATA_GPA))  # the boot region is present; the data region is not
        machine.boot(program, params)
        uffd = Uffd(UFFD_FEATURE_SIGBUS | UFFD_FEATURE_MISSING_SHMEM)
        for region in memory.regions:
            uffd.register(region.hva, region.size)
        tracker = PageTracker(memory, zero_bitmap)
        tracker.mark_present(0, DATA_GPA // PAGE_SIZE, Arrival.EAGER)
        installer = Installer(uffd, memory, tracker, wake=False)
        resolver = ExitModeResolver(installer, readahead_base=readahead_base, readahead_max=readahead_max)
        retry = RetryContext()

        poll_ns = fetch_poll_ns(vcpus) if poll else 0

        def connect(poll_ns: int = 0) -> SyncPageConnection:
            sockets.append(SyncPageConnection(url, token, receive_timeout=retry.policy.request_timeout_s,
                                              poll_ns=poll_ns))
            return sockets[-1]
        for thread in machine.vcpus:  # as the destination does: each vCPU's own, behind the retry wrapper
            connection = RetryingSyncConnection.open(lambda: connect(poll_ns), retry)
            connections.append(connection)
            prefetch = RetryingSyncConnection.open(connect, retry) if readahead_max > 1 else None
            if prefetch is not None:  # the scan's prefetcher, as Destination.prepare opens it
                connections.append(prefetch)
            resolver.prepare(thread, connection, prefetch)  # type: ignore[arg-type]
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        services = machine.services
        t0 = time.perf_counter()
        machine.start()
        # Polled: a vCPU that fails does not wake the guest services' waiters.
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (finished := services.wait_for(lambda: all(p.done_pages >= 0 for p in services.progress), POLL_S)):
            if machine.failures() or time.monotonic() > deadline:
                break
        seconds = time.perf_counter() - t0
        machine.check()
        if not finished:
            raise FaultVmError(f"touch guest with {vcpus} vCPUs did not finish in {RUN_TIMEOUT_S:.0f} s")
        pages = sum(p.done_pages for p in services.progress)
        if inspect is not None:
            inspect(resolver, memory)
        return ScanResult(vcpus, pages, seconds, latencies_ns(resolver.fault_logs().values()),
                          sum(c.requests for c in sockets))
    finally:
        sys.setswitchinterval(old_interval)
        if machine is not None:
            machine.stop()
        if resolver is not None:
            resolver.close()  # stops the prefetchers before RAM goes
        if machine is not None:
            machine.close()  # stops the vCPUs and unmaps RAM
        else:
            memory.close()
        for connection in connections:
            connection.close()
        if uffd is not None:
            uffd.close()
