"""While memory is missing the vCPU threads yield the CPU to the transfer (vcpu_priority.py):
reniced after the resume, set back when every page is present or the migration fails, and left
alone where asked (0) or where this process could not set them back."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
from collections.abc import Iterator

import pytest

import postcopy.destination.migration as migration
import postcopy.destination.vcpu_priority as vcpu_priority
from postcopy.api.models import IncomingSpec
from postcopy.demo import render
from postcopy.destination.migration import Destination, DestinationState, MigrationError
from postcopy.destination.vcpu_priority import POSTCOPY_VCPU_NICE, VcpuPriority
from postcopy.source.page_server import PageServer
from source_thread import migrate_in_process, past_memtouch_fill  # type: ignore[import-not-found]
from postcopy.destination import private_loop
from vmm import priority
from vmm.priority import NICE_BLOCK, GuestNice, may_set_nice, nice_relax, nice_urgent, set_thread_nice, thread_nice
from vmm.vcpu import VcpuThread

pytestmark = pytest.mark.usefixtures("kvm_available", "uffd_available")
# Lowering the vCPUs' priority is only done where it can be undone (vmm.priority.may_set_nice).
may_renice = pytest.mark.skipif(not may_set_nice(thread_nice(threading.get_native_id())),
                                reason="setting a thread back to its nice value needs CAP_SYS_NICE or RLIMIT_NICE")


def _vcpu_nices(dest: Destination) -> list[int]:
    assert dest.machine is not None
    return [thread_nice(t.tid) for t in dest.machine.vcpus]


class TransferWatch:
    """Replaces the background transfer: records the vCPUs' nice values as it starts (and the
    levels their GuestNice holds), then runs it (or fails at once, with ``fail``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
        self.threads: list[VcpuThread] = []  # set by the test after the switchover
        self.nices: list[int] | None = None
        self.levels: list[tuple[int, int] | None] = []  # (base, low) of each vCPU's GuestNice
        real = migration.run_background

        async def watched(connections, installer, **kw):  # type: ignore[no-untyped-def]
            self.nices = [thread_nice(t.tid) for t in self.threads]
            self.levels = [(g.base, g.low) if (g := t.guest_nice) else None for t in self.threads]
            if fail:
                raise MigrationError("the transfer broke (test)")
            await real(connections, installer, **kw)
        monkeypatch.setattr(migration, "run_background", watched)

    def switched_over(self, dest: Destination) -> list[int]:
        """The vCPUs' nice values after the switchover, before the transfer."""
        assert dest.machine is not None
        self.threads = list(dest.machine.vcpus)
        return _vcpu_nices(dest)

    def lowered(self, before: list[int]) -> bool:
        """Every vCPU's guest ran at POSTCOPY_VCPU_NICE as the transfer started (a vCPU in the
        middle of a fault is at its own nice then: exit mode resolves faults at it)."""
        return (self.levels == [(b, POSTCOPY_VCPU_NICE) for b in before] and self.nices is not None
                and all(n in (POSTCOPY_VCPU_NICE, b) for n, b in zip(self.nices, before)))


@may_renice
@pytest.mark.parametrize("mode", ["exit", "classic"])
def test_vcpus_run_reniced_while_memory_is_missing_and_get_their_priority_back(
        monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    watch = TransferWatch(monkeypatch)

    async def check(server: PageServer, dest: Destination) -> None:
        assert dest.machine is not None
        await dest.switchover()
        before = watch.switched_over(dest)
        result = await dest.wait_complete(timeout=60)
        assert watch.lowered(before) and POSTCOPY_VCPU_NICE not in before
        if mode == "classic":  # its vCPUs sleep in the kernel on a fault: they never go back up
            assert watch.nices == [POSTCOPY_VCPU_NICE] * len(before)
        assert result.vcpu_nice == POSTCOPY_VCPU_NICE  # the report says so
        assert _vcpu_nices(dest) == before  # set back at completion, the guest still running
        assert dest.state is DestinationState.COMPLETE and not dest.machine.failures()

    migrate_in_process(check, fault_mode=mode)


@may_renice
def test_an_exit_mode_vcpu_fetches_its_page_at_its_own_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest runs at POSTCOPY_VCPU_NICE, but a fault's fetch is the transfer's most urgent
    work: the vCPU thread makes it at the nice it had before (GuestNice.urgent). The vCPUs are
    lowered after the resume (the first KVM_RUNs are downtime), so a fetch already under way
    then finishes at the lower nice: each vCPU's first fetch seen lowered may be that one. The
    shared loop's fetches, which all go through the connection's fetch (the private loops':
    the next test)."""
    monkeypatch.setenv("POSTCOPY_PRIVATE_LOOPS", "0")
    seen: list[tuple[int, int, int]] = []  # (vCPU, nice while fetching, nice before the migration)

    async def check(server: PageServer, dest: Destination) -> None:
        assert dest.machine is not None
        for connection in dest._vcpu_connections:
            real = connection.fetch

            def fetch(gpa: int, count: int, kind: str, real=real):  # type: ignore[no-untyped-def]
                me = threading.get_native_id()
                thread = next(t for t in dest.machine.vcpus if t.tid == me)  # type: ignore[union-attr]
                if thread.guest_nice is not None:
                    seen.append((thread.id, thread_nice(me), thread.guest_nice.base))
                return real(gpa, count, kind)
            connection.fetch = fetch  # type: ignore[method-assign]
        # Past memtouch's fill: its in-order writes are scans, whose pages the prefetchers fetch
        # (on 2 busy CPUs the transfer could end within the fill, no vCPU fetching at all).
        await past_memtouch_fill(server)
        await dest.switchover()
        await dest.wait_complete(timeout=60)

    migrate_in_process(check, background_batch_pages=4, background_depth=1)  # pages stay missing a while
    assert any(nice == base for _, nice, base in seen), f"no fetch at the vCPU's own nice: {seen}"
    firsts = {vcpu: i for i, (vcpu, _, _) in reversed(list(enumerate(seen)))}
    assert all(nice == base for i, (_, nice, base) in enumerate(seen) if i not in firsts.values()), seen


@may_renice
@pytest.mark.skipif(private_loop.unavailable() is not None, reason=f"no private fault loop here: {private_loop.unavailable()}")
def test_an_exit_mode_vcpu_in_its_private_loop_fetches_at_its_own_priority() -> None:
    """The same where the fetches are made in the vCPUs' private loops (nice_urgent, with the
    block GuestNice.share fills), which no hook here reaches: sampled from beside them while
    memory is missing, a vCPU thread is seen at its lowered nice (running the guest) and back at
    its own (fetching)."""
    samples: list[tuple[int, int, int]] = []  # (nice seen, the vCPU's own, its lowered)

    async def check(server: PageServer, dest: Destination) -> None:
        assert dest.machine is not None
        # Past memtouch's fill, whose in-order writes are scans (fetched by the shared windows).
        await past_memtouch_fill(server)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for t in dest.machine.vcpus:  # type: ignore[union-attr]
                    # Lowered before the nice is read and still after: GuestNice sets it low
                    # before it is the thread's, and restore takes it away before the end.
                    guest_nice = t.guest_nice
                    nice = thread_nice(t.tid)
                    if guest_nice is not None and t.guest_nice is guest_nice:
                        samples.append((nice, guest_nice.base, guest_nice.low))
                done.wait(0.0002)
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            await dest.switchover()
            report = await dest.wait_complete(timeout=60)
        finally:
            done.set()
            sampler.join()
        assert report.private_fault_loops == len(dest.machine.vcpus)

    migrate_in_process(check, background_batch_pages=4, background_depth=1)  # pages stay missing a while
    assert samples and all(base != low for _, base, low in samples)
    assert any(nice == low for nice, _, low in samples), "never seen running the guest lowered"
    # 17-29% of ~1,000 samples here; 0-0.7% where the loop's fetches stay lowered (the shared
    # path's few: a scan's windows, zero pages)
    at_base = sum(nice == base for nice, base, _ in samples)
    assert at_base >= len(samples) // 20, f"seen at its own nice in {at_base} of {len(samples)} samples"


@contextlib.contextmanager
def _idle_thread() -> Iterator[int]:
    """A thread that waits until the block ends: its tid."""
    tid: list[int] = []
    go, done = threading.Event(), threading.Event()
    t = threading.Thread(target=lambda: (tid.append(threading.get_native_id()), go.set(), done.wait(10)))
    t.start()
    try:
        assert go.wait(10)
        yield tid[0]
    finally:
        done.set()
        t.join()


@may_renice
def test_guest_nice_puts_a_thread_back_up_for_urgent_work_until_it_ends() -> None:
    with _idle_thread() as tid:
        base = thread_nice(tid)
        g = GuestNice(tid, base, base + 7)
        assert thread_nice(tid) == base + 7
        g.urgent()
        assert thread_nice(tid) == base
        g.relax()
        assert thread_nice(tid) == base + 7
        g.end()
        assert thread_nice(tid) == base
        g.relax()  # a fault that was under way when it ended: stays up
        g.urgent()
        g.relax()
        assert thread_nice(tid) == base


@may_renice
def test_a_failed_migration_sets_the_vcpus_back_too(monkeypatch: pytest.MonkeyPatch) -> None:
    watch = TransferWatch(monkeypatch, fail=True)

    async def check(server: PageServer, dest: Destination) -> None:
        assert dest.machine is not None
        await dest.switchover()
        before = watch.switched_over(dest)
        with pytest.raises(MigrationError, match="the transfer broke"):
            await dest.wait_complete(timeout=60)
        assert watch.lowered(before)
        assert _vcpu_nices(dest) == before and dest.state is DestinationState.FAILED

    migrate_in_process(check)


@pytest.mark.parametrize("why", ["vcpu_nice=0", "may not set back"])
def test_vcpus_keep_their_priority_when_asked_or_when_it_could_not_come_back(
        monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    watch = TransferWatch(monkeypatch)
    options = {"vcpu_nice": 0} if why == "vcpu_nice=0" else {}
    if why == "may not set back":
        monkeypatch.setattr(vcpu_priority, "may_set_nice", lambda nice: False)

    async def check(server: PageServer, dest: Destination) -> None:
        assert dest.machine is not None
        await dest.switchover()
        before = watch.switched_over(dest)
        result = await dest.wait_complete(timeout=60)
        assert watch.nices == before == _vcpu_nices(dest) and result.vcpu_nice == 0
        assert watch.levels == [None] * len(before)

    migrate_in_process(check, **options)


def test_thread_nice_is_per_thread_and_root_may_set_it_back() -> None:
    tid: list[int] = []
    go, done = threading.Event(), threading.Event()

    def worker() -> None:
        tid.append(threading.get_native_id())
        go.set()
        done.wait(10)
    t = threading.Thread(target=worker)
    t.start()
    try:
        assert go.wait(10)
        mine = thread_nice(threading.get_native_id())
        set_thread_nice(tid[0], mine + 5)
        assert thread_nice(tid[0]) == mine + 5 and thread_nice(threading.get_native_id()) == mine
        if may_set_nice(mine):  # root here (CAP_SYS_NICE); an unprivileged run says no
            set_thread_nice(tid[0], mine)
            assert thread_nice(tid[0]) == mine
        else:
            with pytest.raises(PermissionError):
                set_thread_nice(tid[0], mine)
    finally:
        done.set()
        t.join()


@pytest.mark.parametrize("nice", [-1, 20])
def test_a_vcpu_nice_out_of_range_is_refused(nice: int) -> None:
    with pytest.raises(ValueError, match="vcpu_nice must be 0 to 19"):
        VcpuPriority(nice)


def test_an_incoming_migration_takes_vcpu_nice_from_its_request() -> None:
    base = {"source_url": "http://10.0.0.1:7000", "token": "t"}
    assert IncomingSpec.parse(base).vcpu_nice == POSTCOPY_VCPU_NICE
    assert IncomingSpec.parse({**base, "vcpu_nice": 0}).vcpu_nice == 0
    assert IncomingSpec.parse({**base, "vcpu_nice": 19}).vcpu_nice == 19


@pytest.mark.parametrize("nice, line", [(10, "nice 10 until every page was present"), (0, "unchanged during post-copy")])
def test_the_demo_report_says_what_the_vcpus_ran_at(nice: int, line: str) -> None:
    report = {"guest_mib": 32, "vcpus": 2, "fault_mode": "exit", "downtime_ms": 3.0, "total_ms": 90.0,
              "pages": {"demand": 1}, "exit_kinds": {"mmio": 1}, "pagein_rate": 1.0, "vcpu_nice": nice,
              "guest": {"before": {}, "after": {}}, "verified": True, "guest_errors": 0}
    assert f"  vCPU priority   {line}" in render(report).splitlines()


@may_renice
def test_a_shared_guest_nice_is_urgent_and_relaxed_without_its_lock_and_an_end_always_wins() -> None:
    """What a private fault loop does on the vCPU thread (vmm.priority.nice_urgent/nice_relax,
    reading GuestNice.share's block): the same levels as urgent/relax; and an end that comes
    between its urgent and its relax, in either order with the relax's low, leaves the thread
    at its base."""
    with _idle_thread() as tid:
        base = thread_nice(tid)
        block = (ctypes.c_int64 * NICE_BLOCK)()
        g = GuestNice(tid, base, base + 7)
        g.share(block)
        assert list(block) == [1, base, base + 7]
        assert nice_urgent(block, tid) and thread_nice(tid) == base
        nice_relax(block, tid)
        assert thread_nice(tid) == base + 7
        assert nice_urgent(block, tid)
        g.end()  # between the urgent and the relax
        nice_relax(block, tid)
        assert thread_nice(tid) == base and block[0] == 0
        assert not nice_urgent(block, tid)  # ended: nothing to do
        # The end's base set before the relax's low, as a race can order them: the relax's
        # second look puts it back.
        g2 = GuestNice(tid, base, base + 7)
        g2.share(block)
        real_set = priority.set_thread_nice

        def end_in_between(who: int, nice: int) -> None:
            if nice == base + 7 and block[0]:
                g2.end()  # clears on, sets base
            real_set(who, nice)
        priority.set_thread_nice = end_in_between  # type: ignore[assignment]
        try:
            assert nice_urgent(block, tid)
            nice_relax(block, tid)
        finally:
            priority.set_thread_nice = real_set  # type: ignore[assignment]
        assert thread_nice(tid) == base


@may_renice
def test_niced_vcpus_with_private_fault_loops_complete_a_migration_and_get_their_priority_back() -> None:
    if private_loop.unavailable() is not None:
        pytest.skip(f"no private fault loop here: {private_loop.unavailable()}")
    results: list[dict] = []

    async def check(server: PageServer, dest: Destination) -> None:
        await dest.switchover()
        assert dest.machine is not None
        result = await dest.wait_complete(timeout=60)
        results.append({"private": result.private_fault_loops, "nice": result.vcpu_nice,
                        "after": [thread_nice(t.tid) for t in dest.machine.vcpus]})

    migrate_in_process(check, background_batch_pages=4, background_depth=1, readahead_base=1, readahead_max=1)
    r, = results
    assert r["private"] == 2 and r["nice"] == POSTCOPY_VCPU_NICE
    assert POSTCOPY_VCPU_NICE not in r["after"]  # set back once every page was present
