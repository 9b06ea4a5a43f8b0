"""The scan prefetcher (postcopy/destination/prefetch.py): a real guest scanning against a real
page server with every page checked, and a prefetcher alone (no guest) on registered RAM whose
connection drops, dies for good, or is closed mid-scan."""
from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from postcopy.bench.common import source_process
from postcopy.bench.fault_vm import scan
from postcopy.chaos import ChaosProxy, ChaosSchedule
from postcopy.source.page_server import PageServer
from postcopy.destination.classic_mode import cpu_beside, vcpu_cpus
from postcopy.destination.client import FetchError, SyncPageConnection
from postcopy.destination.exit_mode import ExitModeResolver
from postcopy.destination.install import Installer
from postcopy.destination.pages import IN_FLIGHT, Arrival, PageTracker
from postcopy.destination.prefetch import Prefetcher
from postcopy.destination.retry import RetryContext, RetryingSyncConnection, RetryPolicy
from proto import PAGE_SIZE
from vmm.guest.layout import DATA_GPA
from vmm.memory import GuestMemory
from vmm.uffd import Uffd, UffdError

from served_memory import SERVED_TOKEN, Served  # type: ignore[import-not-found]
from test_retry import FAST, run_behind_proxy  # type: ignore[import-not-found]

pytestmark = pytest.mark.usefixtures("uffd_available")
MiB = 1 << 20
BATCH = 256


@pytest.mark.usefixtures("kvm_available")
@pytest.mark.parametrize("vcpus", [1, 2])
def test_a_scanning_guest_meets_prefetched_pages_and_every_page_is_the_sources(vcpus: int) -> None:
    guest = 16 * MiB
    data_pages = (guest - DATA_GPA) // PAGE_SIZE
    with source_process(guest, 2, prefill=1.0) as source:
        header, zero_bitmap = asyncio.run(source.pause())
        seen: dict[str, object] = {}

        def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
            tracker = resolver.tracker
            assert tracker.missing() == 0 and IN_FLIGHT not in tracker.state  # no claim left behind
            prefetchers = [st.prefetcher for st in resolver.states.values()]
            assert all(p is not None and p.failed is None for p in prefetchers)
            # each beside its vCPU, pinned round robin as the destination pins them
            assert [p.cpu for p in prefetchers] == [cpu_beside(c) for c in vcpu_cpus(vcpus)]  # type: ignore[union-attr]
            seen["windows"] = sum(p.windows for p in prefetchers if p is not None)
            check = SyncPageConnection(source.url, source.token)  # the source's pages, asked for again
            try:
                for gpa in range(DATA_GPA, guest, BATCH * PAGE_SIZE):
                    batch = check.fetch(gpa, BATCH, "background")
                    assert batch.count == BATCH
                    want = b"".join(bytes(n * PAGE_SIZE) if data is None else bytes(data) for _, n, data in batch.runs())
                    assert memory.read(gpa, BATCH * PAGE_SIZE) == want, f"gpa {gpa:#x}"
            finally:
                check.close()

        result = scan(header, zero_bitmap, source.url, source.token, vcpus, readahead_base=4, readahead_max=256,
                      inspect=inspect)
    assert result.pages == data_pages
    # Most windows came from the prefetchers: the guest exited a few times a vCPU, not per window.
    assert seen["windows"] >= data_pages // 256 // 2  # type: ignore[operator]
    assert len(result.latency_ns) < data_pages // 64


@contextmanager
def registered_ram(size: int, zero_map: bytes | None = None) -> Iterator[Installer]:
    """Empty registered RAM with no guest (pages may be read only once present)."""
    uffd = Uffd(0)
    memory = GuestMemory.create(size, "anon")
    try:
        for region in memory.regions:
            uffd.register(region.hva, region.size)
        tracker = PageTracker(memory, zero_map)  # without one, zero pages come as zero runs of a batch
        yield Installer(uffd, memory, tracker, wake=False)
    finally:
        memory.close()
        uffd.close()


@contextmanager
def prefetching(url: str, size: int, ctx: RetryContext, *, zero_map: bytes | None = None, open_now: bool = True,
                receive_timeout: float | None = None, **prefetcher_args: int) -> Iterator[tuple[Installer, Prefetcher]]:
    """A prefetcher alone on empty registered RAM, its connection to ``url`` opened now (or at
    its first request); closed when the block ends."""
    with registered_ram(size, zero_map) as installer:
        def connect() -> SyncPageConnection:
            return SyncPageConnection(url, SERVED_TOKEN, receive_timeout=receive_timeout)
        conn = RetryingSyncConnection.open(connect, ctx) if open_now else RetryingSyncConnection(connect, ctx)
        prefetcher = Prefetcher(installer, conn, **prefetcher_args)
        try:
            yield installer, prefetcher
        finally:
            prefetcher.close()


def wait_until(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_prefetcher_reconnects_through_drops_and_installs_every_page_right(served: Served) -> None:
    schedule = ChaosSchedule(seed=5, kinds=("drop", "truncate"), after_bytes=(20_000, 600_000), max_faults=4)

    async def body(url: str, proxy: ChaosProxy) -> None:
        ctx = RetryContext(RetryPolicy(deadline_s=10, request_timeout_s=2, **FAST))  # type: ignore[arg-type]

        def run() -> None:
            pages = served.memory.pages
            with prefetching(url, served.memory.size, ctx, receive_timeout=2, window_max=64,
                             ahead_pages=pages) as (installer, prefetcher):
                tracker = installer.tracker
                prefetcher.follow(0)
                assert wait_until(lambda: tracker.missing() == 0), f"{tracker.missing()} pages missing"
                assert prefetcher.failed is None and IN_FLIGHT not in tracker.state
                assert prefetcher.wait(tracker.npages - 1)  # present: no wait
                assert installer.memory.read(0, served.memory.size) == served.memory.read(0, served.memory.size)

        await asyncio.to_thread(run)
        assert proxy.stats.faults_injected >= 1 and ctx.report()["reconnects"] >= 1

    run_behind_proxy(served, schedule, body)


def test_a_prefetcher_whose_source_never_comes_back_gives_its_claims_back(served: Served) -> None:
    schedule = ChaosSchedule(seed=1, kinds=("drop",), after_bytes=(1, 1))  # every connection dies at once

    async def body(url: str, proxy: ChaosProxy) -> None:
        ctx = RetryContext(RetryPolicy(deadline_s=0.3, **FAST))  # type: ignore[arg-type]

        def run() -> None:
            with prefetching(url, served.memory.size, ctx, open_now=False, window_max=64) as (installer, prefetcher):
                tracker = installer.tracker
                prefetcher.follow(8)
                assert prefetcher.reached(8)
                assert wait_until(lambda: prefetcher.failed is not None)
                assert isinstance(prefetcher.failed, FetchError)
                assert wait_until(lambda: IN_FLIGHT not in tracker.state)  # every claim given back
                assert tracker.missing() == tracker.npages
                assert not prefetcher.reached(8) and not prefetcher.wait(8)  # the vCPU fetches alone

        await asyncio.to_thread(run)

    run_behind_proxy(served, schedule, body)


def test_a_prefetcher_whose_install_fails_partway_leaves_every_page_countable(served: Served) -> None:
    """The kernel refuses a window's install halfway (ENOMEM, say): the prefetcher stops and
    gives its claim back, and the pages that went in are counted by that install, so once the
    rest arrives (as the background brings it) every page is counted and completion is seen."""
    size = served.memory.size

    def run(url: str) -> None:
        with prefetching(url, size, RetryContext(RetryPolicy(**FAST)), window_max=64,  # type: ignore[arg-type]
                         ahead_pages=served.memory.pages) as (installer, prefetcher):
            uffd, tracker = installer.uffd, installer.tracker
            copy = uffd.copy

            def copy_half_then_fail(dst: int, src: int, length: int, mode: int = 0, existed: list[int] | None = None) -> int:
                uffd.copy = copy  # once
                half = length // 2 // PAGE_SIZE * PAGE_SIZE
                error = UffdError("UFFDIO_COPY: Cannot allocate memory", errno.ENOMEM)
                error.installed = error.reached = copy(dst, src, half, mode, existed)
                raise error
            uffd.copy = copy_half_then_fail  # type: ignore[method-assign]
            prefetcher.follow(0)
            assert wait_until(lambda: prefetcher.failed is not None)
            assert isinstance(prefetcher.failed, UffdError)
            assert wait_until(lambda: IN_FLIGHT not in tracker.state)
            assert tracker.present > 0  # the half that went in
            check = SyncPageConnection(url, SERVED_TOKEN)
            try:
                for gpa in range(0, size, BATCH * PAGE_SIZE):
                    installer.install_batch(check.fetch(gpa, BATCH, "background"), Arrival.BACKGROUND)
            finally:
                check.close()
            assert tracker.missing() == 0 and tracker.all_present.is_set()
            assert installer.memory.read(0, size) == served.memory.read(0, size)

    async def main() -> None:
        header = served.header
        async with PageServer.resumed(served.memory, header, header.encode(), token=SERVED_TOKEN) as server:
            await asyncio.to_thread(run, await server.start("127.0.0.1", 0))
    asyncio.run(main())


def test_closing_a_prefetcher_mid_scan_stops_it_at_once_and_leaves_no_claim(served: Served) -> None:
    # The first answer stalls for longer than the test may take: windows stay in flight.
    schedule = ChaosSchedule(seed=1, kinds=("stall",), after_bytes=(400, 400), stall_s=(30.0, 30.0), stall_drop=0.0,
                             max_faults=1)

    async def body(url: str, proxy: ChaosProxy) -> None:
        ctx = RetryContext(RetryPolicy(deadline_s=60, request_timeout_s=30, **FAST))  # type: ignore[arg-type]

        def run() -> None:
            with prefetching(url, served.memory.size, ctx, receive_timeout=30, window_max=64) as (installer, prefetcher):
                tracker = installer.tracker
                prefetcher.follow(0)
                assert wait_until(lambda: IN_FLIGHT in tracker.state)
                time.sleep(0.1)
                claimed = tracker.state.index(IN_FLIGHT)
                t0 = time.monotonic()
                prefetcher.close()
                assert time.monotonic() - t0 < 2.0
                assert prefetcher.failed is None  # stopped, not failed
                assert IN_FLIGHT not in tracker.state and not prefetcher.wait(claimed)

        await asyncio.to_thread(run)

    run_behind_proxy(served, schedule, body)


def test_a_prefetcher_stays_within_its_horizon_and_a_new_scan_starts_its_own(served: Served) -> None:
    async def body(url: str, proxy: ChaosProxy) -> None:
        def run() -> None:
            with prefetching(url, served.memory.size, RetryContext(), window_max=8,
                             ahead_pages=16) as (installer, prefetcher):
                tracker = installer.tracker
                prefetcher.follow(200)
                assert wait_until(lambda: tracker.present == 16 and IN_FLIGHT not in tracker.state)
                prefetcher.follow(0)  # elsewhere: 16 from here, not up to the old scan's horizon
                assert wait_until(lambda: tracker.present == 32 and IN_FLIGHT not in tracker.state)
                time.sleep(0.05)
                assert tracker.present == 32 and prefetcher.windows == 4
                assert all(tracker.is_present(p) for p in [*range(0, 16), *range(200, 216)])

        await asyncio.to_thread(run)

    run_behind_proxy(served, ChaosSchedule(max_faults=0), body)


def test_a_scan_goes_on_past_the_zero_maps_runs_made_here(served: Served) -> None:
    zero_map = bytes([0x01]) * (served.memory.pages // 8)  # fill_pattern: every 8th page is zero

    async def body(url: str, proxy: ChaosProxy) -> None:
        def run() -> None:
            with prefetching(url, served.memory.size, RetryContext(), zero_map=zero_map, window_max=64,
                             ahead_pages=served.memory.pages) as (installer, prefetcher):
                tracker = installer.tracker
                prefetcher.follow(1)
                assert wait_until(lambda: tracker.missing() == 1 and IN_FLIGHT not in tracker.state)
                assert tracker.counts[Arrival.ZERO] == tracker.npages // 8 - 1  # all but page 0, behind it
                assert tracker.counts[Arrival.READAHEAD] == tracker.npages - tracker.npages // 8
                size = served.memory.size - PAGE_SIZE
                assert installer.memory.read(PAGE_SIZE, size) == served.memory.read(PAGE_SIZE, size)

        await asyncio.to_thread(run)

    run_behind_proxy(served, ChaosSchedule(max_faults=0), body)


def test_without_readahead_no_prefetcher_starts(served: Served) -> None:
    async def body(url: str, proxy: ChaosProxy) -> None:
        def run() -> None:
            with registered_ram(served.memory.size) as installer:
                resolver = ExitModeResolver(installer, readahead_base=1, readahead_max=1, private_loops=False)
                conn = RetryingSyncConnection.open(lambda: SyncPageConnection(url, SERVED_TOKEN), RetryContext())

                class Thread:  # what prepare reads and sets on a vCPU thread
                    id = 0
                    block_sigbus = False
                    fault_handler = None
                prefetch = RetryingSyncConnection.open(lambda: SyncPageConnection(url, SERVED_TOKEN), RetryContext())
                resolver.prepare(Thread(), conn, prefetch)  # type: ignore[arg-type]
                try:
                    assert resolver.states[0].prefetcher is None
                    prefetch.ctx.aborted.set()  # a closed connection may not open a new socket
                    with pytest.raises(FetchError):  # prepare closed it: nobody uses it
                        prefetch.fetch(0, 1, "demand")
                finally:
                    resolver.close()

        await asyncio.to_thread(run)

    run_behind_proxy(served, ChaosSchedule(max_faults=0), body)


def test_cpu_beside_is_another_cpu_this_process_may_use() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    assert cpu_beside(None) is None  # a vCPU the scheduler places: so is its prefetcher
    if len(cpus) < 2:
        assert cpu_beside(cpus[0]) is None
        return
    assert [cpu_beside(c) for c in cpus] == [*cpus[1:], cpus[0]]
    assert cpu_beside(max(cpus) + 1) is None  # a CPU this process may not use


def test_a_prefetcher_runs_on_the_cpu_it_was_given(served: Served) -> None:
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)

    async def body(url: str, proxy: ChaosProxy) -> None:
        def run() -> None:
            with prefetching(url, served.memory.size, RetryContext(), window_max=8, ahead_pages=16,
                             cpu=cpu) as (installer, prefetcher):
                prefetcher.follow(0)
                assert wait_until(lambda: installer.tracker.present == 16)
                assert os.sched_getaffinity(prefetcher._thread.native_id) == {cpu}  # type: ignore[arg-type]
                assert os.sched_getaffinity(0) == allowed  # only its own thread was pinned

        await asyncio.to_thread(run)

    run_behind_proxy(served, ChaosSchedule(max_faults=0), body)
