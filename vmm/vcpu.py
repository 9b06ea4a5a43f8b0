"""The vCPU thread: one KVM_RUN loop per vCPU, with every exit going through one dispatcher.

Pausing follows KVM's rule for consistent state: the pending exit is handled, then the loop
re-enters KVM_RUN with ``immediate_exit`` set so KVM completes the emulated I/O and returns
EINTR; only then does the thread park. A kick is ``immediate_exit = 1`` plus a signal to the
thread, which makes a running KVM_RUN return EINTR.
"""
from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Protocol

from vmm import libc
from vmm.abi import kvm as abi
from vmm.devices.bus import PioBus
from vmm.kvm import EXIT_REASON_U32, Vcpu
from vmm.memory import GuestMemory
from vmm.priority import MAX_NICE, NICE_BLOCK, GuestNice, may_set_nice, thread_nice

log = logging.getLogger("vmm.vcpu")
KICK_SIGNAL = signal.SIGUSR1
EINTR, EFAULT = errno.EINTR, errno.EFAULT
NO_EXIT = -1  # exit_counts key for KVM_RUN returning -1
KVM_EXIT_MMIO, KVM_EXIT_IO = abi.KVM_EXIT_MMIO, abi.KVM_EXIT_IO  # the hot loop's two exits


class VcpuState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"  # the guest executed hlt with interrupts off: it is done
    STOPPED = "stopped"
    FAILED = "failed"


class VcpuError(Exception):
    """A vCPU stopped on an exit it cannot handle; the message names the vCPU and the exit."""


class MemoryFaultHandler(Protocol):
    """Resolves an exit caused by the guest touching guest RAM that is not there yet.

    ``on_fault_exit`` is called on the vCPU thread for KVM_RUN errors (EFAULT: upstream's
    KVM_EXIT_MEMORY_FAULT, or a queued SIGBUS), KVM_EXIT_MMIO inside guest RAM, and
    KVM_EXIT_INTERNAL_ERROR; it returns True when the exit was a missing page and is resolved
    (the vCPU re-enters), False when it was not a memory fault at all."""

    def on_fault_exit(self, thread: VcpuThread, ret: int) -> bool: ...


_kick_installed = False


def install_kick_handler() -> None:
    """A no-op handler for KICK_SIGNAL: its only job is to interrupt KVM_RUN. Main thread only."""
    global _kick_installed
    if not _kick_installed:
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        _kick_installed = True


class VcpuThread:
    """Runs one vCPU on a thread of its own."""

    def __init__(self, vcpu: Vcpu, memory: GuestMemory, pio: PioBus) -> None:
        self.vcpu = vcpu
        self.id = vcpu.id
        self.memory = memory
        self.pio = pio
        self.fault_handler: MemoryFaultHandler | None = None
        self.fault_state: object = None  # the fault handler's own data for this vCPU
        # The fault handler's own KVM_RUN loop for this vCPU, in place of _loop: it takes its
        # usual exit itself and hands every other to handle_exit (exit mode's fault path).
        self.run_loop: Callable[[], VcpuState] | None = None
        self.state = VcpuState.CREATED
        self.error: str | None = None
        self.exit_counts: dict[int, int] = {}
        self.first_run_ns = 0  # CLOCK_MONOTONIC of the first KVM_RUN (downtime ends there)
        self.finished_ns = 0  # CLOCK_MONOTONIC when the thread halted, stopped or failed
        self.cpu: int | None = None  # pin the thread to this host CPU when it starts (placement)
        self.block_sigbus = False  # set by fault handlers that read SIGBUS with sigtimedwait
        # While set, the guest runs at its lower priority and the fault handler resolves a fault
        # at the thread's own (vmm.priority; the destination sets it while memory is missing).
        self._guest_nice: GuestNice | None = None
        # guest_nice as a private fault loop on this thread reads it (GuestNice.share): on, base, low
        self.nice_block = (ctypes.c_int64 * NICE_BLOCK)()
        self.tid = 0
        self._paused_nice: GuestNice | None = None  # while a pause keeps the thread at MAX_NICE
        self._resumes = 0  # resume() calls: a parked thread waits for the next
        self._request: str | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.id}", daemon=True)

    @property
    def guest_nice(self) -> GuestNice | None:
        return self._guest_nice

    @guest_nice.setter
    def guest_nice(self, value: GuestNice | None) -> None:
        if self._guest_nice is not None:
            self._guest_nice.share(None)
        self._guest_nice = value
        if value is not None:
            value.share(self.nice_block)
        else:
            self.nice_block[0] = 0

    # -- control (any thread) -----------------------------------------------------------------
    def start(self) -> None:
        install_kick_handler()
        self._thread.start()

    def kick(self) -> None:
        self.vcpu.run_struct.immediate_exit = 1
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive():
            libc.pthread_kill(ident, KICK_SIGNAL)

    def pause(self, timeout: float = 5.0) -> None:
        """Stop the vCPU at a point where its state is consistent; returns when parked."""
        self.lower_priority()
        self.request_pause()
        self.wait_paused(timeout)

    def lower_priority(self) -> None:
        """Before a pause: run this thread at MAX_NICE until it is resumed, where this process
        may set it back (vmm.priority). On a busy host the pausing thread, or a kicked vCPU
        thread, could otherwise wait a whole scheduler slice behind a vCPU thread still running
        guest code: Machine.pause lowers them all before it kicks any. Measured on the source
        of whole migrations of a busy 2-vCPU guest (docs/performance.md): without it the pause
        took 2.8-3.6 ms in 7 of 24, with it 0.4-0.9 ms in all of 48 run before and after."""
        if self._paused_nice is not None or not self.tid or self.state is not VcpuState.RUNNING:
            return
        try:
            nice = thread_nice(self.tid)
            if nice < MAX_NICE and may_set_nice(nice):
                self._paused_nice = GuestNice(self.tid, nice, MAX_NICE)
        except OSError:  # the thread ended meanwhile, or this process may not renice it
            pass

    def request_pause(self) -> None:
        """Ask the vCPU to park and kick it out of KVM_RUN; wait_paused waits for it (Machine
        asks every vCPU before it waits for any: they stop in parallel)."""
        with self._changed:
            if self.state not in (VcpuState.RUNNING, VcpuState.CREATED):
                return
            self._request = "pause"
            if not self._thread.is_alive():
                return  # not started: it parks as soon as it starts
        self.kick()

    def wait_paused(self, timeout: float = 5.0) -> None:
        settled = (VcpuState.PAUSED, VcpuState.HALTED, VcpuState.FAILED, VcpuState.STOPPED)
        with self._changed:
            if self._request != "pause" or not self._thread.is_alive():
                return  # not asked (it was not running), or not started: it parks as it starts
            if not self._changed.wait_for(lambda: self.state in settled, timeout):
                raise VcpuError(f"vCPU {self.id} did not pause within {timeout} s")

    def resume(self) -> None:
        with self._changed:
            self._resumes += 1
            if self._request == "pause":
                self._request = None
            if self.state is VcpuState.PAUSED:
                self.state = VcpuState.RUNNING
            self._restore_priority()
            self._changed.notify_all()

    def _restore_priority(self) -> None:
        paused, self._paused_nice = self._paused_nice, None
        if paused is not None:
            try:
                paused.end()
            except OSError:  # the thread ended meanwhile
                pass

    def stop(self, timeout: float = 5.0) -> None:
        with self._changed:
            self._request = "stop"
            self._changed.notify_all()
        self.kick()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the vCPU halts, fails or stops; True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the vCPU thread ------------------------------------------------------------------------
    def _main(self) -> None:
        self.tid = libc.gettid()
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})  # 0: this thread
        if self.block_sigbus:
            mask = libc.sigset_t.of(signal.SIGBUS)
            libc.pthread_sigmask(libc.SIG_BLOCK, ctypes.byref(mask), None)
        with self._changed:
            if self._request == "pause":
                self._park()
            if self._request == "stop":
                self._finish(VcpuState.STOPPED)
                return
            self.state = VcpuState.RUNNING
        if self.first_run_ns == 0:
            self.first_run_ns = time.monotonic_ns()
        try:
            final = self.run_loop() if self.run_loop is not None else self._loop()
        except Exception as e:  # noqa: BLE001 - a vCPU must report, never vanish
            log.exception("vCPU %d failed", self.id)
            self.error = f"vCPU {self.id}: {e}"
            final = VcpuState.FAILED
        self._finish(final)

    def _finish(self, state: VcpuState) -> None:
        self.finished_ns = time.monotonic_ns()
        with self._changed:
            self.state = state
            self._changed.notify_all()

    def _park(self) -> None:
        """Called with _changed held: wait until resumed (or stopped). Not until the pause request
        is gone: a pause asked again between the resume and this thread's waking would keep it
        parked while resume() has already called it running, and that pause would wait for it in
        vain. The new request's kick set immediate_exit, so the next KVM_RUN returns at once and
        the thread parks again, as PAUSED."""
        self.state = VcpuState.PAUSED
        self._changed.notify_all()
        resumes = self._resumes
        self._changed.wait_for(lambda: self._resumes != resumes or self._request == "stop")

    def _service_request(self) -> bool:
        """After EINTR: park or stop as asked. True means leave the loop."""
        with self._changed:
            if self._request == "pause":
                self._park()
            if self._request == "stop":
                return True
            self.state = VcpuState.RUNNING
        return False

    def _loop(self) -> VcpuState:
        fd, ioctl, KVM_RUN = self.vcpu.fd, fcntl.ioctl, abi.KVM_RUN
        handle = self.handle_exit
        while True:
            try:  # Vcpu.run, inlined: one Python call less per exit
                ioctl(fd, KVM_RUN)
                ret = 0
            except OSError as e:
                ret = -e.errno
            final = handle(ret)
            if final is not None:
                return final

    def handle_exit(self, ret: int) -> VcpuState | None:
        """What KVM_RUN returned (0, or -errno) and the exit it left in kvm_run, handled the
        general way; the state to end in, or None to re-enter. A run_loop hands here every exit
        it does not take itself."""
        counts = self.exit_counts
        run = self.vcpu.run_struct
        if ret:
            counts[NO_EXIT] = counts.get(NO_EXIT, 0) + 1
            if self.fault_handler is not None and self.fault_handler.on_fault_exit(self, ret):
                return None
            if ret == -EINTR:
                run.immediate_exit = 0
                if self._request is not None and self._service_request():
                    return VcpuState.STOPPED
                return None
            raise VcpuError(f"vCPU {self.id}: KVM_RUN failed: {errno.errorcode.get(-ret, -ret)} "
                            f"(exit reason {abi.KVM_EXIT_NAMES.get(run.exit_reason, run.exit_reason)})")
        reason = self.vcpu.run_u32[EXIT_REASON_U32]
        counts[reason] = counts.get(reason, 0) + 1
        if reason == KVM_EXIT_MMIO:  # first: on this host, a missing page of guest RAM
            handler = self.fault_handler
            if handler is None or not handler.on_fault_exit(self, 0):
                self._mmio(run)
        elif reason == KVM_EXIT_IO:
            self._pio(run.io)
        elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
            if self.fault_handler is None or not self.fault_handler.on_fault_exit(self, 0):
                raise VcpuError(self._describe_internal_error(run.internal))
        elif reason == abi.KVM_EXIT_HLT:
            return VcpuState.HALTED
        elif reason == abi.KVM_EXIT_SHUTDOWN:
            raise VcpuError(f"vCPU {self.id}: the guest shut down (triple fault) at rip {self.vcpu.get_regs().rip:#x}")
        elif reason == abi.KVM_EXIT_INTR:
            pass
        else:
            raise VcpuError(f"vCPU {self.id}: unhandled exit {abi.KVM_EXIT_NAMES.get(reason, reason)}")
        return None

    def _pio(self, io: abi.kvm_run_io) -> None:
        size, port, count = io.size, io.port, io.count
        data = self.vcpu.run_address + io.data_offset
        fmt = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32}[size]
        for i in range(count):
            cell = fmt.from_address(data + i * size)
            if io.direction == abi.KVM_EXIT_IO_OUT:
                self.pio.write(self, port, size, cell.value)
            else:
                cell.value = self.pio.read(self, port, size)

    def _mmio(self, run: abi.kvm_run) -> None:
        """An MMIO exit the fault handler did not take (faults.py tells a missing RAM page from
        real MMIO); without a handler, one inside RAM means a page is missing and nobody can
        bring it."""
        if self.fault_handler is None and self.memory.contains(run.mmio.phys_addr, max(run.mmio.len, 1)):
            raise VcpuError(f"vCPU {self.id}: an access to guest RAM at gpa {run.mmio.phys_addr:#x} came back as MMIO: "
                            "the page is missing and no fault handler is set")
        # No MMIO devices: reads return all ones, writes are dropped (logged once by the bus).
        mmio = run.mmio
        self.pio.report_unknown(self, mmio.phys_addr, "MMIO " + ("write" if mmio.is_write else "read"))
        if not mmio.is_write:
            ctypes.memset(ctypes.addressof(mmio.data), 0xFF, mmio.len)

    def _describe_internal_error(self, internal: abi.kvm_run_internal) -> str:
        kinds = {abi.KVM_INTERNAL_ERROR_EMULATION: "emulation failure", abi.KVM_INTERNAL_ERROR_SIMUL_EX: "exception during exception",
                 abi.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failure"}
        data = ", ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
        return (f"vCPU {self.id}: KVM internal error ({kinds.get(internal.suberror, internal.suberror)}) "
                f"at rip {self.vcpu.get_regs().rip:#x} [{data}]")
