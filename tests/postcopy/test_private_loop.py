"""Exit mode's fault loop in a private interpreter per vCPU (private_loop.py and
private_fault_loop.py): a real guest on registered RAM pages in every data page over a real page
stream; what the loop does not take itself (an answer after a ping, a zero page, a dropped
socket) is finished by the thread's own interpreter with its retries; a failure there fails the
vCPU with its traceback; and where no interpreter can be had the vCPU runs the shared loop."""
from __future__ import annotations

import asyncio
import ctypes
import os
import random
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from postcopy.bench import BenchError, pagein
from postcopy.bench.fault_vm import scan
from postcopy.bench.source import SourceImage
from postcopy.destination import private_loop
from postcopy.destination.exit_mode import ExitModeResolver
from postcopy.destination.pages import PRESENT, Arrival
from proto import PAGE_SIZE, PageRequest, build_page_batch
from proto.fastpath import one_page_head
from vmm import interp
from vmm.guest.layout import DATA_GPA
from vmm.machine import MachineError
from vmm.memory import GuestMemory
from vmm.vcpu import KVM_EXIT_MMIO, VcpuState, install_kick_handler

from fake_pages import serve_answers  # type: ignore[import-not-found]
from source_thread import migrate_in_process, past_memtouch_fill  # type: ignore[import-not-found]

pytestmark = [pytest.mark.usefixtures("kvm_available", "uffd_available"),
              pytest.mark.skipif(private_loop.unavailable() is not None,
                                 reason=f"no private fault loop here: {private_loop.unavailable()}")]
GUEST = 4 << 20
DATA_PAGES = (GUEST - DATA_GPA) // PAGE_SIZE
HEADER = SimpleNamespace(regions=[SimpleNamespace(gpa=0, size=GUEST)])  # what scan reads of a MigrationHeader
SOURCE = bytearray(random.Random(7).randbytes(GUEST))


@pytest.fixture(autouse=True)
def _kick_handler() -> None:
    install_kick_handler()  # the scans run on the fake server's client thread


def _served(gpa: int, count: int) -> bytes:
    """As the page server answers: one data page in the fault path's fixed layout."""
    pages = bytes(SOURCE[gpa:gpa + count * PAGE_SIZE])
    if count == 1 and any(pages):
        return one_page_head(gpa, pages) + pages
    return build_page_batch(gpa, count, pages)


def _scan(answer: Any, vcpus: int, inspect: Any = None, **serve: Any) -> Any:
    result: list[Any] = []
    serve_answers(answer, lambda url: result.append(
        scan(HEADER, bytes(GUEST // PAGE_SIZE // 8), url, "t", vcpus, readahead_base=1, readahead_max=1,
             inspect=inspect)), **serve)
    return result[0]


def _check_every_page(resolver: ExitModeResolver, memory: GuestMemory, *, private: bool) -> None:
    tracker = resolver.tracker
    assert all((st.private is not None) == private for st in resolver.states.values())
    assert tracker.state.count(PRESENT) == tracker.npages
    assert tracker.counts[Arrival.DEMAND] == DATA_PAGES
    assert memory.view(DATA_GPA, GUEST - DATA_GPA) == SOURCE[DATA_GPA:]  # every page as the source served it
    assert sum(len(st.faults) for st in resolver.states.values()) == DATA_PAGES  # one record per fault
    if private:  # and one MMIO exit counted per fault, wherever it was taken
        assert sum(st.private.thread.exit_counts.get(KVM_EXIT_MMIO, 0)  # type: ignore[union-attr]
                   for st in resolver.states.values()) == DATA_PAGES


@pytest.mark.parametrize("vcpus", [1, 2])
def test_every_page_comes_in_through_the_private_loops(vcpus: int) -> None:
    seen: list[bool] = []

    def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
        _check_every_page(resolver, memory, private=True)
        assert len(resolver.tracker.created) == 0  # no page took the shared path
        seen.append(True)
    result = _scan(lambda r: _served(r.gpa, r.count), vcpus, inspect)
    assert seen and result.pages == DATA_PAGES and result.fetches == DATA_PAGES
    assert len(result.latency_ns) == DATA_PAGES and all(result.latency_ns)


def test_the_records_a_loop_holds_are_flushed_from_outside_for_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vCPU that faults with no other exit keeps up to LOG_RECORDS faults in its loop, which
    nothing has seen: a migration's report, made as the last page arrives, would miss them (a
    1-vCPU demo beside a CPU hog reported no MMIO exit at all). flush_from_outside kicks the
    vCPU out of KVM_RUN and waits until its loop has returned and flushed."""
    hold = DATA_GPA + 100 * PAGE_SIZE  # the 101st fault of the touch guest's only vCPU
    resolvers: list[ExitModeResolver] = []
    prepare = ExitModeResolver.prepare

    def kept(self: ExitModeResolver, *args: Any, **kw: Any) -> None:
        resolvers.append(self)
        prepare(self, *args, **kw)
    monkeypatch.setattr(ExitModeResolver, "prepare", kept)
    seen: dict[str, Any] = {}
    flusher: list[threading.Thread] = []

    def flush(st: Any) -> None:
        seen["flushed"] = st.private.flush_from_outside(st.private.thread.kick, 10.0)
        seen["after"] = len(st.faults)

    def answer(r: PageRequest) -> bytes:
        if r.gpa == hold and not flusher:  # the loop waits for this page: it holds 100 faults
            st = resolvers[0].states[0]
            seen["before"] = len(st.faults)
            flusher.append(threading.Thread(target=flush, args=(st,)))
            flusher[0].start()
            time.sleep(0.05)
            seen["waited"] = flusher[0].is_alive()  # until the loop returns, after this answer
        return _served(r.gpa, r.count)

    def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
        flusher[0].join(10)
        _check_every_page(resolver, memory, private=True)
    _scan(answer, 1, inspect)
    assert seen["before"] == 0 and seen["waited"], seen  # held in the loop, and the flush waited for them
    # The 100 before and the held page's own, at once (not at the next full buffer)
    assert seen["flushed"] and 101 <= seen["after"] < private_loop.LOG_RECORDS, seen


def test_an_answer_behind_a_ping_is_finished_by_the_threads_own_interpreter() -> None:
    # Every answer comes after a ping: the loop sees another frame head and hands the fetch back
    # (FETCH); BlockingWebSocket answers the ping and reads the page, which is installed there.
    def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
        _check_every_page(resolver, memory, private=True)
        assert sum(m.made for m in resolver.tracker.makers) == 0  # each installed by install_page, here
    result = _scan(lambda r: _served(r.gpa, r.count), 2, inspect, ping=True)
    assert result.pages == DATA_PAGES


def test_a_zero_page_answer_is_installed_by_the_threads_own_interpreter() -> None:
    zero_pages = {DATA_GPA + 5 * PAGE_SIZE, DATA_GPA + 77 * PAGE_SIZE}
    saved = {gpa: bytes(SOURCE[gpa:gpa + PAGE_SIZE]) for gpa in zero_pages}
    for gpa in zero_pages:
        SOURCE[gpa:gpa + PAGE_SIZE] = bytes(PAGE_SIZE)
    try:
        def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
            _check_every_page(resolver, memory, private=True)
            # the data pages made in the loops, the two zero pages by install_batch (mark_present)
            assert sum(m.made for m in resolver.tracker.makers) == DATA_PAGES - 2
            assert len(resolver.tracker.created) == 0
        _scan(lambda r: _served(r.gpa, r.count), 1, inspect)
    finally:
        for gpa, page in saved.items():
            SOURCE[gpa:gpa + PAGE_SIZE] = page


def test_a_dropped_socket_is_reopened_and_the_page_asked_again() -> None:
    # The server drops the socket instead of answering every 100th request: the loop's recv
    # sees the end, the retrying connection opens a new socket and asks again, and the loop
    # goes on with the new socket.
    asked = [0]
    lock = threading.Lock()

    def answer(r: PageRequest) -> bytes | None:
        with lock:
            asked[0] += 1
            if asked[0] % 100 == 0:
                return None
        return _served(r.gpa, r.count)
    reconnects: list[int] = []

    def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
        _check_every_page(resolver, memory, private=True)
        assert sum(m.made for m in resolver.tracker.makers) >= DATA_PAGES - DATA_PAGES // 100
        reconnects.extend(st.connection.ctx.stats.reconnects for st in resolver.states.values())
    _scan(answer, 2, inspect, drop_on_none=True)
    assert sum(reconnects) >= DATA_PAGES // 100 - 1


def test_a_failure_in_the_private_loop_fails_the_vcpu_with_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    run = private_loop.PrivateLoop.run

    def broken(self: private_loop.PrivateLoop) -> Any:
        self.interp.run(f"loop.LOOPS[{ctypes.addressof(self.shared)}]['ram'] = None")  # its first completed access raises
        return run(self)
    monkeypatch.setattr(private_loop.PrivateLoop, "run", broken)
    with pytest.raises(MachineError, match=r"(?s)private fault loop failed.*TypeError"):
        _scan(lambda r: _served(r.gpa, r.count), 1)


def test_without_an_interpreter_the_vcpu_runs_the_shared_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def none_left(cpu: int | None = None) -> interp.PrivateInterpreter:
        raise interp.InterpreterUnavailable("all 8 private interpreters are in use")
    monkeypatch.setattr(interp, "acquire", none_left)

    def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
        _check_every_page(resolver, memory, private=False)
        assert len(resolver.tracker.created) == DATA_PAGES and not resolver.tracker.makers
    _scan(lambda r: _served(r.gpa, r.count), 2, inspect)


def test_interpreters_go_back_to_the_pool_when_the_vcpus_end() -> None:
    before = len(interp._free)
    _scan(lambda r: _served(r.gpa, r.count), 2)
    assert len(interp._free) >= max(before, 2) and len(interp._pool) <= interp.MAX_INTERPRETERS


def test_ram_in_two_regions_keeps_the_shared_loop() -> None:
    # The loop there completes an access by one region's offset: RAM in several regions goes
    # to the general path, whose decoder knows the layout.
    two = SimpleNamespace(regions=[SimpleNamespace(gpa=0, size=GUEST // 2), SimpleNamespace(gpa=GUEST, size=GUEST // 2)])
    seen: list[bool] = []

    def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
        seen.append(all(st.private is None for st in resolver.states.values()))
    serve_answers(lambda r: _served(r.gpa % GUEST, r.count) if r.gpa < GUEST else _served(r.gpa - GUEST // 2, r.count),
                  lambda url: scan(two, bytes(GUEST // PAGE_SIZE // 8), url, "t", 2, readahead_base=1,
                                   readahead_max=1, inspect=inspect))
    assert seen == [True]


@pytest.mark.parametrize("vcpus", [4])
def test_more_vcpus_than_cpus_page_in_through_their_private_loops(vcpus: int) -> None:
    # The vCPUs pinned to one CPU share its interpreter (interp.acquire), each with its loop.
    cpus = sorted(os.sched_getaffinity(0))
    shared: list[dict[int, set[int]]] = []

    def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
        _check_every_page(resolver, memory, private=True)
        by_interp: dict[int, set[int]] = {}
        for st in resolver.states.values():
            assert st.private is not None
            by_interp.setdefault(id(st.private.interp), set()).add(st.private.thread.cpu)  # type: ignore[arg-type]
        shared.append(by_interp)
    assert _scan(lambda r: _served(r.gpa, r.count), vcpus, inspect).pages == DATA_PAGES
    by_interp, = shared
    assert len(by_interp) == min(vcpus, len(cpus)) and all(len(c) == 1 for c in by_interp.values())


def test_a_migration_paused_and_resumed_while_its_vcpus_fault_completes() -> None:
    # A pause kicks each vCPU out of KVM_RUN: the private loop hands the EINTR back, and the
    # thread parks in its own interpreter, between two faults or after a fetch it finished.
    reports: list[Any] = []

    async def check(server: Any, dest: Any) -> None:
        await dest.switchover()
        for _ in range(5):
            await asyncio.sleep(0.01)
            await asyncio.to_thread(dest.machine.pause)
            assert all(t.state is VcpuState.PAUSED for t in dest.machine.vcpus)
            dest.machine.resume()
        reports.append(await dest.wait_complete(timeout=60))
        assert dest.machine.services.errors == 0 and not dest.machine.failures()

    migrate_in_process(check, background_batch_pages=1, background_depth=1, readahead_base=1, readahead_max=1,
                       vcpu_nice=0)
    report, = reports
    assert report.private_fault_loops == 2 and report.pages["demand"] > 0


def test_warm_leaves_interpreters_in_the_pool_with_the_loop_imported() -> None:
    private_loop.warm(2)
    held = [interp.acquire(), interp.acquire()]
    try:
        for private in held:
            private.run("assert loop.Shared.__name__ == 'Shared'")  # the module is there, imported
    finally:
        for private in held:
            interp.release(private)


def test_a_failure_in_a_classic_handlers_private_loop_fails_the_handler_with_its_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    run = private_loop.PrivateHandler.run

    def broken(self: private_loop.PrivateHandler) -> None:
        # its first one-page fault raises
        self.interp.run(f"loop.LOOPS[{ctypes.addressof(self.shared)}]['state'] = None")
        run(self)
    monkeypatch.setattr(private_loop.PrivateHandler, "run", broken)
    with pytest.raises(BenchError, match=r"(?s)classic handler failed.*private fault loop failed.*TypeError"):
        pagein.run_python(SourceImage(GUEST), "classic", 1)


def test_the_loop_imports_where_sys_path_does_not_name_the_project(monkeypatch: pytest.MonkeyPatch) -> None:
    # An editable install finds the packages through an import hook, which a private
    # interpreter does not have: run from another directory, sys.path does not name them.
    root = str(Path(private_loop.__file__).resolve().parents[2])
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", root, ".")])
    private = interp.acquire()
    try:
        private.run("import sys\nfor m in [m for m in sys.modules if m.split('.')[0] in ('postcopy', 'proto', 'vmm')]:\n"
                    "    del sys.modules[m]")  # as a fresh interpreter: nothing imported yet
        private.run(private_loop._import_loop())
        private.run("assert loop.Shared.__name__ == 'Shared'")
    finally:
        interp.release(private)


def test_a_loop_that_cannot_be_set_up_leaves_the_vcpu_on_the_shared_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(private_loop, "_import_loop", lambda: "import no_such_module_here")

    def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
        _check_every_page(resolver, memory, private=False)
    _scan(lambda r: _served(r.gpa, r.count), 2, inspect)


@pytest.mark.parametrize("vcpus", [1, 2])
def test_with_readahead_from_one_page_a_scan_goes_to_windows_and_the_rest_stays_in_the_loop(vcpus: int) -> None:
    # Readahead from one page (base 1, windows up to 256): each vCPU's first fault is taken in
    # its private loop, one page; the next, where that one ended, is a scan, handed back to the
    # thread's own interpreter, whose windows and prefetcher bring the rest of the slice.
    seen: list[bool] = []

    def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
        tracker = resolver.tracker
        assert all(st.private is not None and st.prefetcher is not None for st in resolver.states.values())
        assert tracker.state.count(PRESENT) == tracker.npages
        assert memory.view(DATA_GPA, GUEST - DATA_GPA) == SOURCE[DATA_GPA:]
        made_in_loops = sum(m.made for m in tracker.makers)
        counts = tracker.counts
        # At least one vCPU's first fault (on a busy host a vCPU that starts late may find its
        # slice's start brought by the other's prefetcher, which does not stop at slices)
        assert made_in_loops >= 1 and counts[Arrival.READAHEAD] > DATA_PAGES // 2
        assert counts[Arrival.DEMAND] + counts[Arrival.READAHEAD] == DATA_PAGES
        assert sum(len(st.faults) for st in resolver.states.values()) < DATA_PAGES // 8  # windows, not faults
        seen.append(True)
    serve_answers(lambda r: _served(r.gpa, r.count), lambda url: scan(
        HEADER, bytes(GUEST // PAGE_SIZE // 8), url, "t", vcpus, readahead_base=1, readahead_max=256, inspect=inspect))
    assert seen == [True]


@pytest.mark.parametrize("vcpus", [1, 2])
def test_a_first_window_wider_than_one_page_is_fetched_and_installed_in_the_loop(vcpus: int) -> None:
    # Readahead from 4 pages, no wider (4, 4): each vCPU's first fault is taken in its private
    # loop with the three pages behind it (four one-page requests, answered in order); the
    # next fault, where that window ended, is a scan, handed back to the windows there.
    seen: list[bool] = []

    def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
        tracker = resolver.tracker
        assert all(st.private is not None for st in resolver.states.values())
        assert tracker.state.count(PRESENT) == tracker.npages
        assert memory.view(DATA_GPA, GUEST - DATA_GPA) == SOURCE[DATA_GPA:]
        made = [(m.made, m.made_readahead) for m in tracker.makers]
        assert made == [(4, 3)] * vcpus  # the faulting page and the three behind it
        first = DATA_GPA // PAGE_SIZE
        assert all(tracker.arrival[p] == Arrival.READAHEAD for p in range(first + 1, first + 4))
        counts = tracker.counts
        assert counts[Arrival.READAHEAD] >= 3 * vcpus
        assert counts[Arrival.DEMAND] + counts[Arrival.READAHEAD] == DATA_PAGES
        seen.append(True)
    serve_answers(lambda r: _served(r.gpa, r.count), lambda url: scan(
        HEADER, bytes(GUEST // PAGE_SIZE // 8), url, "t", vcpus, readahead_base=4, readahead_max=4, inspect=inspect))
    assert seen == [True]


def test_a_window_with_an_answer_not_in_the_fixed_layout_is_asked_again_for_its_page_alone() -> None:
    # A zero page the zero map does not name (it says none are) sits in the first window: its
    # answer is a batch, which the loop does not parse, so the socket is out of step. The loop
    # hands the faulting page back (EPROTO); the thread's own interpreter opens a new socket and
    # asks for that page alone; nothing of the window was installed, and every page arrives.
    zero_gpa = DATA_GPA + 2 * PAGE_SIZE
    saved = bytes(SOURCE[zero_gpa:zero_gpa + PAGE_SIZE])
    SOURCE[zero_gpa:zero_gpa + PAGE_SIZE] = bytes(PAGE_SIZE)
    reconnects: list[int] = []
    try:
        def inspect(resolver: ExitModeResolver, memory: GuestMemory) -> None:
            tracker = resolver.tracker
            assert tracker.state.count(PRESENT) == tracker.npages
            assert memory.view(DATA_GPA, GUEST - DATA_GPA) == SOURCE[DATA_GPA:]
            assert tracker.arrival[DATA_GPA // PAGE_SIZE] == Arrival.DEMAND
            reconnects.extend(st.connection.ctx.stats.reconnects for st in resolver.states.values())
        serve_answers(lambda r: _served(r.gpa, r.count), lambda url: scan(
            HEADER, bytes(GUEST // PAGE_SIZE // 8), url, "t", 1, readahead_base=4, readahead_max=4, inspect=inspect))
    finally:
        SOURCE[zero_gpa:zero_gpa + PAGE_SIZE] = saved
    assert reconnects == [1]


@pytest.mark.parametrize("fault_mode", ["exit", "classic"])
def test_a_migration_with_readahead_from_four_pages_takes_its_first_windows_in_the_private_loops(
        fault_mode: str) -> None:
    # memtouch walks its pages at random: with readahead from 4 pages almost every fault is a
    # first window, taken in the private loops once the source's zero map has come (a loop
    # that is running when it comes sees it at its next missing page: PageTracker.set_zero_map).
    reports: list[Any] = []
    made: list[tuple[int, int]] = []

    async def check(server: Any, dest: Any) -> None:
        # Past memtouch's fill, which writes every page in order: its faults would be scans.
        await past_memtouch_fill(server)
        await dest.switchover()
        reports.append(await dest.wait_complete(timeout=60))
        made.extend((m.made, m.made_readahead) for m in dest.tracker.makers)
        assert dest.machine.services.errors == 0 and not dest.machine.failures()

    migrate_in_process(check, fault_mode=fault_mode, background_batch_pages=1, background_depth=1, vcpu_nice=0,
                       readahead_base=4)
    report, = reports
    assert len(made) == 2 and sum(ra for _, ra in made) > 0 and sum(m - ra for m, ra in made) > 0
    assert report.pages["readahead"] >= sum(ra for _, ra in made)
