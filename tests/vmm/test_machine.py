"""vmm.machine with real guests: the touch and memtouch workloads, pause/resume, guest-detected
corruption, config errors, and the UART and port-I/O bus (through a guest and directly)."""
from __future__ import annotations

import errno
import struct
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

from vmm import vcpu as vcpu_module
from vmm.devices.bus import PioBus
from vmm.devices.guest_services import GuestServices
from vmm.devices.uart import UART_LSR, UART_LSR_THRE, Uart
from vmm.guest import services as gs
from vmm.guest import workloads
from vmm.guest.asm import AL, DX, EAX, EDX, R8, RAX, Assembler
from vmm.guest.layout import CODE_GPA, DATA_GPA, PAGE_SIZE, BootParams
from vmm.guest.pattern import expected_page
from vmm.guest.program import ENTRY_LABEL, emit_exception_stubs, link
from vmm.machine import Machine, MachineConfig, MachineError
from vmm.priority import MAX_NICE, set_thread_nice, thread_nice
from vmm.vcpu import KVM_EXIT_IO, VcpuState

GUEST_BYTES = 16 << 20
DATA_PAGES = (GUEST_BYTES - DATA_GPA) // PAGE_SIZE
# This host's KVM (PVM) emulates guest ring-0 code at ~1.5 M instructions/s, and memtouch
# spends ~4 k instructions per page: it gets a small guest (~1.3 s to fill) and frequent reports.
MEMTOUCH_BYTES = 4 << 20
MEMTOUCH_REPORT_EVERY = 64
WAIT_S = 10.0
UNKNOWN_PORT = 0x80  # POST-code port: no device of ours sits there

kvm_only = pytest.mark.usefixtures("kvm_available")


class Guests:
    """Builds, boots and starts machines; closes them all at the end of the test."""

    def __init__(self) -> None:
        self.machines: list[Machine] = []

    def start(self, workload: str, nvcpus: int, *, write: bool = False, seed: int = 1,
              console: Callable[[str], None] | None = None) -> tuple[Machine, list[BootParams]]:
        size = MEMTOUCH_BYTES if workload == "memtouch" else GUEST_BYTES
        program, params = workloads.plan(workload, size, nvcpus, seed, write=write, report_every=MEMTOUCH_REPORT_EVERY)
        m = Machine.create(MachineConfig(size, nvcpus), console=console)
        self.machines.append(m)
        m.boot(program, params)
        m.start()
        return m, params

    def close(self) -> None:
        for m in self.machines:
            m.close()


@pytest.fixture
def guests() -> Iterator[Guests]:
    g = Guests()
    yield g
    g.close()


def _wait_reports(m: Machine, count: int = 2) -> None:
    """Waits until every vCPU has sent ``count`` GS_REPORTs (so its fill phase is over)."""
    ok = m.services.wait_for(lambda: all(p.reports >= count for p in m.services.progress) or bool(m.failures()), WAIT_S)
    m.check()
    assert ok, f"memtouch did not report within {WAIT_S} s: reports {[p.reports for p in m.services.progress]}"


def _stale_pages(m: Machine, params: list[BootParams]) -> list[list[int]]:
    """Per vCPU, the pages whose bytes are not the pattern at the generation its table holds."""
    out = []
    for p in params:
        gens = struct.unpack(f"<{p.npages}Q", m.memory.read(p.gen_gpa, 8 * p.npages))
        data = m.memory.read(p.data_gpa, p.npages * PAGE_SIZE)
        out.append([i for i in range(p.npages)
                    if data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] != expected_page(p, i, gens[i])])
    return out


# -- touch -------------------------------------------------------------------------------------

@kvm_only
@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("nvcpus", [1, 2])
def test_touch_reports_every_page_of_each_slice_via_gs_done(guests: Guests, nvcpus: int, write: bool) -> None:
    m, params = guests.start("touch", nvcpus, write=write)
    done = m.services.wait_for(lambda: all(p.done_pages >= 0 for p in m.services.progress), WAIT_S)
    m.check()
    assert done, f"GS_DONE missing: done_pages {[p.done_pages for p in m.services.progress]}"
    assert [p.done_pages for p in m.services.progress] == [p.npages for p in params]
    assert sum(p.done_pages for p in m.services.progress) == DATA_PAGES
    m.pause()
    for i in range(DATA_PAGES):
        gpa = DATA_GPA + i * PAGE_SIZE
        want = gpa if write else 0  # a write stores the page's own gpa in its first qword
        assert struct.unpack("<Q", m.memory.read(gpa, 8))[0] == want, f"page at {gpa:#x}"


# -- memtouch ------------------------------------------------------------------------------------

@kvm_only
@pytest.mark.parametrize("nvcpus", [1, 2])
def test_memtouch_verifies_pages_without_errors_and_a_sweep_covers_every_page(guests: Guests, nvcpus: int) -> None:
    m, params = guests.start("memtouch", nvcpus, seed=0x1234)
    _wait_reports(m)
    assert all(p.verified > 0 for p in m.services.progress)
    assert m.services.errors == 0
    assert m.services.sweep(WAIT_S), "the sweep did not finish"
    m.pause()
    m.check()
    for p, bp in zip(m.services.progress, params):
        assert p.sweep_pages == bp.npages and p.sweep_errors == 0 and not p.page_errors
    assert m.services.errors == 0
    # The guest really wrote its pattern: every page matches its generation (at most the one
    # page each vCPU was rewriting when paused may be caught halfway).
    assert all(len(stale) <= 1 for stale in _stale_pages(m, params)), _stale_pages(m, params)


@kvm_only
def test_guest_detects_a_page_corrupted_by_the_host_while_paused(guests: Guests) -> None:
    m, params = guests.start("memtouch", 1)
    _wait_reports(m)
    m.pause()
    assert m.services.errors == 0
    bad_gpa = params[0].data_gpa + 10 * PAGE_SIZE
    qword = 448  # the last sample: not the head, which the rewrite phase rewrites
    addr = bad_gpa + qword * 8
    (value,) = struct.unpack("<Q", m.memory.read(addr, 8))
    m.memory.write(addr, struct.pack("<Q", value ^ 1))
    m.resume()
    assert m.services.sweep(WAIT_S)
    m.pause()
    p = m.services.progress[0]
    assert p.page_errors, "the guest reported no GS_PAGE_ERROR"
    pfn, index, expected, found = p.page_errors[0]
    assert (pfn, index) == (bad_gpa >> 12, qword)
    assert expected ^ found == 1
    assert p.errors + p.sweep_errors > 0


@kvm_only
def test_pause_stops_progress_and_resume_continues_it_monotonically(guests: Guests) -> None:
    m, _ = guests.start("memtouch", 1)
    _wait_reports(m)
    seen = []
    for _ in range(3):
        m.pause()
        assert all(t.state is VcpuState.PAUSED for t in m.vcpus)
        paused_at = m.services.verified
        time.sleep(0.2)
        assert m.services.verified == paused_at, "the guest made progress while paused"
        seen.append(paused_at)
        m.resume()
        assert m.services.wait_for(lambda: m.services.verified > paused_at, WAIT_S), "no progress after resume"
    m.check()
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen
    assert m.services.errors == 0


@kvm_only
def test_a_paused_vcpu_thread_runs_at_the_lowest_priority_until_resumed(guests: Guests,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # While the pause kicks the vCPUs, none of them may keep the pausing thread (or a kicked
    # one) off a CPU: each is at MAX_NICE from its kick to its resume, then at its own again.
    m, _ = guests.start("memtouch", 2)
    _wait_reports(m)
    tids = [t.tid for t in m.vcpus]
    set_thread_nice(tids[1], 3)  # a priority of its own, which the resume gives back
    m.pause()
    assert [thread_nice(tid) for tid in tids] == [MAX_NICE, MAX_NICE]
    m.resume()
    assert [thread_nice(tid) for tid in tids] == [0, 3]
    paused_at = m.services.verified
    assert m.services.wait_for(lambda: m.services.verified > paused_at, WAIT_S), "no progress after resume"
    # A process that could not set the priority back leaves it alone.
    monkeypatch.setattr(vcpu_module, "may_set_nice", lambda nice: False)
    m.pause()
    assert [thread_nice(tid) for tid in tids] == [0, 3]
    m.resume()
    m.check()


@kvm_only
def test_a_pause_right_after_a_resume_waits_for_a_vcpu_that_has_not_left_its_park_yet(guests: Guests) -> None:
    # resume() calls the vCPUs running before their threads have woken; a pause asked then
    # must still find each parked, not wait for one that went back to sleep in its park.
    m, _ = guests.start("memtouch", 2)
    _wait_reports(m)
    set_thread_nice(m.vcpus[1].tid, 10)  # it wakes later than the thread that resumes and pauses
    for _ in range(100):
        m.pause()
        assert all(t.state is VcpuState.PAUSED for t in m.vcpus)
        m.resume()
    paused_at = m.services.verified
    assert m.services.wait_for(lambda: m.services.verified > paused_at, WAIT_S), "no progress after resume"
    m.check()


@kvm_only
def test_a_run_loop_that_hands_every_exit_to_handle_exit_runs_pauses_and_stops_the_guest() -> None:
    # A fault handler's own loop (exit mode's) replaces _loop; what it does not take itself goes
    # to handle_exit, which must still count exits, serve port I/O, and park or stop on a kick.
    program, params = workloads.plan("memtouch", MEMTOUCH_BYTES, 1, 1, report_every=MEMTOUCH_REPORT_EVERY)
    m = Machine.create(MachineConfig(MEMTOUCH_BYTES, 1))
    try:
        m.boot(program, params)
        thread, handed = m.vcpus[0], []

        def run_loop() -> VcpuState:
            while True:
                ret = thread.vcpu.run()
                handed.append(ret)
                final = thread.handle_exit(ret)
                if final is not None:
                    return final

        thread.run_loop = run_loop
        m.start()
        _wait_reports(m)
        m.pause()
        assert thread.state is VcpuState.PAUSED
        verified = m.services.verified
        m.resume()
        assert m.services.wait_for(lambda: m.services.verified > verified, WAIT_S), "no progress after resume"
        m.check()
        assert handed and sum(thread.exit_counts.values()) == len(handed)
        assert thread.exit_counts.get(KVM_EXIT_IO, 0) > 0 and -errno.EINTR in handed
    finally:
        m.close()
    assert thread.state is VcpuState.STOPPED


# -- configuration errors --------------------------------------------------------------------

@pytest.mark.parametrize("mem,nvcpus,match", [
    (GUEST_BYTES + 1, 1, "multiple of 4 KiB"),
    (GUEST_BYTES - 2048, 1, "multiple of 4 KiB"),
    (0, 1, "multiple of 4 KiB"),
    (1 << 20, 1, "boot region"),
    (17 << 30, 1, "GiB"),
    (GUEST_BYTES, 0, "vCPUs"),
    (GUEST_BYTES, 33, "vCPUs"),
])
def test_bad_config_raises_machine_error(mem: int, nvcpus: int, match: str) -> None:
    with pytest.raises(MachineError, match=match):
        Machine.create(MachineConfig(mem, nvcpus))


@kvm_only
def test_boot_with_the_wrong_number_of_param_blocks_raises_machine_error(guests: Guests) -> None:
    program, params = workloads.plan("touch", GUEST_BYTES, 1, 1)
    m = Machine.create(MachineConfig(GUEST_BYTES, 2))
    guests.machines.append(m)
    with pytest.raises(MachineError, match="1 boot parameter blocks for 2 vCPUs"):
        m.boot(program, params)


# -- UART and the port bus, through a guest -------------------------------------------------

def _port_program(text: str):
    """A guest that prints ``text`` on COM1, writes and reads UNKNOWN_PORT, then reports
    GS_DONE with r8 = what the read returned, and halts."""
    a = Assembler(CODE_GPA)
    a.label(ENTRY_LABEL)
    a.mov(EDX, gs.UART_COM1_PORT)
    for ch in text.encode():
        a.mov(EAX, ch)
        a.out(DX, AL)
    a.mov(EDX, UNKNOWN_PORT)
    a.out(DX, AL)
    a.mov(EAX, 0)
    a.in_(AL, DX)
    a.mov(R8, RAX)
    a.mov(EAX, gs.GS_DONE)
    a.mov(EDX, gs.GS_PORT)
    a.out(DX, EAX)
    a.label("halt")
    a.hlt()
    a.jmp("halt")
    emit_exception_stubs(a)
    return link(a)


@kvm_only
def test_guest_uart_output_reaches_the_console_and_unknown_ports_do_not_stop_it(guests: Guests) -> None:
    lines: list[str] = []
    m = Machine.create(MachineConfig(GUEST_BYTES, 1), console=lines.append)
    guests.machines.append(m)
    _, params = workloads.plan("touch", GUEST_BYTES, 1, 1)
    m.boot(_port_program("hello from the guest\r\nsecond line\n"), params)
    m.start()
    assert m.services.wait_for(lambda: m.services.progress[0].done_pages >= 0, WAIT_S), "the guest did not finish"
    m.check()
    assert lines == ["hello from the guest", "second line"]
    assert m.uart.lines == lines
    assert m.services.progress[0].done_pages == 0xFF  # an unknown port reads as all ones
    assert m.bus.unknown_accesses == 2
    assert m.vcpus[0].state is VcpuState.RUNNING  # halted in the kernel, not failed


# -- devices on their own -----------------------------------------------------------------------

def test_uart_sends_each_line_to_the_console_callback() -> None:
    lines: list[str] = []
    uart = Uart(console=lines.append)
    for b in b"ab\r\ncd\nrest":
        uart.pio_write(None, uart.base, 1, b)
    assert lines == ["ab", "cd"] and uart.lines == ["ab", "cd"]
    assert uart.pio_read(None, uart.base + UART_LSR, 1) & UART_LSR_THRE
    assert uart.get_state()["pending"] == b"rest"


def test_uart_divisor_latch_and_state_round_trip() -> None:
    uart = Uart()
    uart.pio_write(None, uart.base + 3, 1, 0x80)  # LCR.DLAB
    uart.pio_write(None, uart.base + 0, 1, 0x0C)
    uart.pio_write(None, uart.base + 1, 1, 0x00)
    uart.pio_write(None, uart.base + 3, 1, 0x03)
    uart.pio_write(None, uart.base + 7, 1, 0x5A)  # scratch
    assert uart.divisor == 0x0C and uart.pio_read(None, uart.base + 7, 1) == 0x5A
    other = Uart()
    other.set_state(uart.get_state())
    assert other.divisor == 0x0C and other.pio_read(None, other.base + 3, 1) == 0x03
    assert other.pio_read(None, other.base + 7, 1) == 0x5A


def test_bus_counts_unknown_port_accesses_reads_all_ones_and_drops_writes() -> None:
    bus = PioBus()
    uart = Uart()
    bus.add(uart)
    assert bus.read(None, UNKNOWN_PORT, 1) == 0xFF
    assert bus.read(None, UNKNOWN_PORT, 2) == 0xFFFF
    assert bus.read(None, UNKNOWN_PORT + 1, 4) == 0xFFFFFFFF
    bus.write(None, UNKNOWN_PORT, 1, 0x12)
    assert bus.unknown_accesses == 4
    bus.write(None, uart.base + 7, 1, 0x33)  # a known port goes to its device, uncounted
    assert uart.regs[7] == 0x33 and bus.unknown_accesses == 4


def test_bus_refuses_a_second_device_on_a_taken_port() -> None:
    bus = PioBus()
    bus.add(Uart())
    with pytest.raises(ValueError, match="already taken by uart"):
        bus.add(Uart())


def _fake_vcpu(vcpu_id: int, r8: int = 0, r9: int = 0, r10: int = 0, r11: int = 0) -> SimpleNamespace:
    regs = SimpleNamespace(r8=r8, r9=r9, r10=r10, r11=r11)
    return SimpleNamespace(id=vcpu_id, vcpu=SimpleNamespace(get_regs=lambda: regs))


def test_guest_services_records_reports_page_errors_and_sweep_orders() -> None:
    s = GuestServices(2)
    s.pio_write(_fake_vcpu(1, 100, 0, 7, 50), gs.GS_PORT, 4, gs.GS_REPORT)
    assert (s.progress[1].verified, s.progress[1].reports, s.progress[0].reports) == (100, 1, 0)
    s.pio_write(_fake_vcpu(0, 0x300, 5, 1, 2), gs.GS_PORT, 4, gs.GS_PAGE_ERROR)
    assert s.progress[0].page_errors == [(0x300, 5, 1, 2)]
    s.order_all(gs.GS_ORDER_SWEEP)
    assert s.pio_read(_fake_vcpu(0), gs.GS_PORT, 4) == gs.GS_ORDER_SWEEP
    assert s.pio_read(_fake_vcpu(0), gs.GS_PORT, 4) == gs.GS_ORDER_CONTINUE  # a sweep is ordered once
    assert s.pio_read(_fake_vcpu(1), gs.GS_PORT, 4) == gs.GS_ORDER_SWEEP
    s.pio_write(_fake_vcpu(1, 42), gs.GS_PORT, 4, gs.GS_DONE)
    assert s.progress[1].done_pages == 42 and s.progress[0].done_pages == -1
    restored = GuestServices(2)
    restored.set_state(s.get_state())
    assert restored.progress == s.progress and restored.orders == s.orders


@kvm_only
def test_a_machine_paused_before_it_starts_parks_at_once_and_runs_when_resumed() -> None:
    program, params = workloads.plan("touch", GUEST_BYTES, 2, 1)
    m = Machine.create(MachineConfig(GUEST_BYTES, 2))
    try:
        m.boot(program, params)
        t0 = time.monotonic()
        m.pause()  # nothing runs yet: must not wait for a vCPU that never started
        assert time.monotonic() - t0 < 1.0
        m.start()
        time.sleep(0.2)
        assert all(p.done_pages == -1 for p in m.services.progress)  # parked, not running
        m.resume()
        assert m.services.wait_for(lambda: all(p.done_pages >= 0 for p in m.services.progress), WAIT_S)
        assert [p.done_pages for p in m.services.progress] == [p.npages for p in params]
    finally:
        m.close()


@kvm_only
def test_close_keeps_the_vm_and_ram_of_a_vcpu_thread_that_did_not_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vCPU thread blocked past close()'s wait (here in a device callback): its VM, vCPU fd and
    RAM stay, so that it never runs KVM_RUN on a number the next VM's vCPU got, nor touches
    unmapped RAM; once it ends, it ends cleanly."""
    import threading

    from vmm import machine as machine_module
    monkeypatch.setattr(machine_module, "STOP_TIMEOUT_S", 0.2)
    program, params = workloads.plan("memtouch", MEMTOUCH_BYTES, 1, 1, report_every=MEMTOUCH_REPORT_EVERY)
    m = Machine.create(MachineConfig(MEMTOUCH_BYTES, 1))
    entered, release = threading.Event(), threading.Event()

    def blocked_report(vcpu_id: int, progress: object) -> None:
        if not entered.is_set():
            entered.set()
            release.wait(10)
    m.services.on_report = blocked_report  # type: ignore[assignment]
    m.boot(program, params)
    m.start()
    assert entered.wait(WAIT_S)
    thread, fd = m.vcpus[0], m.vcpus[0].vcpu.fd
    m.close()
    assert thread.alive
    other = Machine.create(MachineConfig(MEMTOUCH_BYTES, 1))
    try:
        assert other.vcpus[0].vcpu.fd != fd  # the stuck thread's fd is still its own
        assert m.memory.read(DATA_GPA, 8) is not None  # and its RAM still mapped
        release.set()
        assert thread.wait(WAIT_S) and thread.state is not VcpuState.FAILED, thread.error
        hva = m.memory.regions[0].hva
        m.close()  # now it frees them
        with open("/proc/self/maps") as maps:
            assert not any(int(line.split("-")[0], 16) <= hva < int(line.split()[0].split("-")[1], 16) for line in maps)
    finally:
        release.set()
        other.close()


@kvm_only
def test_a_vm_that_cannot_be_built_leaves_no_fd_and_no_ram_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second vCPU refused: the first vCPU's fd, the VM's, /dev/kvm's and the RAM made for it
    are all closed, and the error names the cause."""
    import os

    from vmm import kvm as kvm_module
    create_vcpu = kvm_module.Vm.create_vcpu

    def second_refused(self, index: int):  # type: ignore[no-untyped-def]
        if index == 1:
            raise kvm_module.KvmError("KVM_CREATE_VCPU: no (test)")
        return create_vcpu(self, index)
    monkeypatch.setattr(kvm_module.Vm, "create_vcpu", second_refused)
    fds = sorted(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps") as f:
        maps = len(f.readlines())
    with pytest.raises(MachineError, match="no \\(test\\)"):
        Machine.create(MachineConfig(GUEST_BYTES, 2))
    assert sorted(os.listdir("/proc/self/fd")) == fds
    with open("/proc/self/maps") as f:
        assert len(f.readlines()) <= maps
