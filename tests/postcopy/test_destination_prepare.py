"""What Destination.prepare sets up for the fault path before the switchover, against a live
page server: the vCPU threads' placement and which connections poll."""
from __future__ import annotations

import asyncio

import pytest

from postcopy.destination.classic_mode import vcpu_cpus
from postcopy.destination.exit_mode import FETCH_POLL_NS
from postcopy.destination.migration import Destination
from postcopy.source.run import boot_memtouch
from source_thread import GUEST, TOKEN, SourceThread  # type: ignore[import-not-found]

pytestmark = pytest.mark.usefixtures("kvm_available", "uffd_available")


def test_a_single_vcpu_polls_for_its_pages_and_every_vcpu_is_pinned() -> None:
    """What prepare() sets up for the fault path: a single vCPU's connection polls (exit mode
    only; never the prefetchers' or the background's), and the vCPU threads are pinned round
    robin in both modes."""
    machine, workload = boot_memtouch(GUEST, 2, seed=5)
    try:
        with SourceThread(machine, workload) as source:
            async def prepare(mode: str, vcpus: int) -> tuple[list[int], list[int], list[int | None]]:
                dest = Destination(source.url, TOKEN, fault_mode=mode)  # type: ignore[arg-type]
                try:
                    await dest.prepare(GUEST, vcpus)
                    assert dest.machine is not None
                    return ([c._conn.ws.poll_ns for c in dest._vcpu_connections],  # type: ignore[union-attr]
                            [c._conn.ws.poll_ns for c in dest._prefetch_connections + dest._background_connections],  # type: ignore[union-attr]
                            [t.cpu for t in dest.machine.vcpus])
                finally:
                    await dest.close()

            for mode, vcpus, polls in (("exit", 1, FETCH_POLL_NS), ("exit", 2, 0), ("classic", 1, 0)):
                vcpu_polls, others, cpus = asyncio.run(prepare(mode, vcpus))
                assert set(vcpu_polls) == {polls} and set(others) == {0}, (mode, vcpus)
                assert cpus == vcpu_cpus(vcpus), (mode, vcpus)
    finally:
        machine.close()


def test_classic_mode_starts_its_handler_threads_before_the_switchover_and_close_ends_them() -> None:
    """The classic handler's threads start in prepare(), pinned beside the vCPUs, so that the
    switchover (the downtime) only releases the vCPUs; a destination closed without a
    switchover stops them."""
    machine, workload = boot_memtouch(GUEST, 2, seed=5)
    try:
        with SourceThread(machine, workload) as source:
            async def prepare() -> tuple[list[int | None], list[bool], list[bool]]:
                dest = Destination(source.url, TOKEN, fault_mode="classic")
                try:
                    await dest.prepare(GUEST, 2)
                    assert dest.classic is not None and dest.state.value == "listen"
                    threads = [h.thread for h in dest.classic.handlers]
                    running = [t is not None and t.is_alive() for t in threads]
                    cpus = [h.cpu for h in dest.classic.handlers]
                finally:
                    await dest.close()
                return cpus, running, [t is not None and t.is_alive() for t in threads]

            cpus, running, after_close = asyncio.run(prepare())
            assert cpus == sorted(set(vcpu_cpus(2)))
            assert running == [True] * len(cpus)
            assert after_close == [False] * len(cpus)
    finally:
        machine.close()


def test_a_failed_prepare_leaves_the_destination_failed_with_its_ram_freed_and_no_second_try() -> None:
    """A VM this host cannot build (0 vCPUs, as a bad source status would say) after RAM was
    made and registered: the destination is FAILED, its RAM unmapped, and it refuses a second
    prepare() and any switchover."""
    from postcopy.destination.migration import DestinationState, MigrationError
    from vmm.memory import GuestMemory

    made: list[GuestMemory] = []
    create = GuestMemory.create

    def remember(*args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(create(*args, **kwargs))
        return made[-1]

    async def scenario() -> None:
        dest = Destination("http://127.0.0.1:9", TOKEN, fault_mode="exit")
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(GuestMemory, "create", staticmethod(remember))
                with pytest.raises(Exception, match="vCPU"):
                    await dest.prepare(16 << 20, 0)
            assert dest.state is DestinationState.FAILED and dest.memory is None
            hva = made[0].regions[0].hva
            with open("/proc/self/maps") as maps:
                assert not any(int(line.split("-")[0], 16) <= hva < int(line.split()[0].split("-")[1], 16)
                               for line in maps), "guest RAM still mapped"
            with pytest.raises(MigrationError, match="prepared once"):
                await dest.prepare(16 << 20, 1)
            with pytest.raises(MigrationError, match="switches over once, from listen"):
                await dest.switchover()
            assert dest.state is DestinationState.FAILED
        finally:
            await dest.close()

    asyncio.run(scenario())


def test_connections_a_cancelled_prepare_was_opening_are_closed_by_close() -> None:
    """prepare() cancelled while its threads open the page connections (a DELETE during setup):
    the sockets they open after the cancel are closed by close(), not lost with the results."""
    import time

    from postcopy.destination.migration import DestinationState

    opened: list[object] = []

    class Socket:
        requests = 0

        def __init__(self) -> None:
            self.closed = False
            opened.append(self)

        def close(self) -> None:
            self.closed = True

    def slow_open(*args: object, **kwargs: object) -> Socket:
        time.sleep(0.3)
        return Socket()

    async def scenario() -> None:
        dest = Destination("http://127.0.0.1:9", TOKEN, fault_mode="exit")
        dest._open_sync = slow_open  # type: ignore[method-assign,assignment]
        try:
            task = asyncio.ensure_future(dest.prepare(16 << 20, 2))
            await asyncio.sleep(0.1)  # RAM and VM made; the threads are connecting
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert dest.state is DestinationState.FAILED
            await asyncio.sleep(0.5)  # they have connected by now, for nobody
        finally:
            await dest.close()
        assert opened and all(s.closed for s in opened), [s.closed for s in opened]  # type: ignore[attr-defined]

    asyncio.run(scenario())
