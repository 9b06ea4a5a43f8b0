"""The one place that wires a VM: KVM objects, guest RAM, devices and vCPU threads.

A Machine either boots a workload (``boot``) or receives the state of a running one
(``vmm.state.restore``); it never writes guest RAM on its own, so a migration destination can
register RAM with userfaultfd before any page is present.
"""
from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from vmm.abi import kvm as abi
from vmm.devices.bus import PioBus
from vmm.devices.guest_services import GuestServices
from vmm.devices.uart import Uart
from vmm.guest import layout as L
from vmm.guest.program import GuestProgram
from vmm.kvm import Kvm, KvmError
from vmm.memory import Backing, GuestMemory, GuestMemoryError
from vmm.vcpu import VcpuError, VcpuState, VcpuThread

log = logging.getLogger("vmm.machine")
# How long close() waits for each vCPU thread to end (a vCPU blocked in a device callback or a
# page it waits for may take a while); one that has not is left its VM, fds and RAM.
STOP_TIMEOUT_S = 5.0

# Page-table entry and descriptor bits (SDM vol. 3, 4.5 and 3.4.5).
PTE_PRESENT, PTE_WRITABLE, PTE_PAGE_SIZE = 1 << 0, 1 << 1, 1 << 7
GDT_ENTRIES = (0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)  # null, code64 (L=1), data (D/B=1)
SEG_TYPE_CODE_XR_ACCESSED, SEG_TYPE_DATA_RW_ACCESSED = 11, 3
IDT_GATE_INTERRUPT64 = 0x8E  # present, DPL 0, 64-bit interrupt gate
IDT_VECTORS = 256


class MachineError(Exception):
    """A VM could not be built or run; the message says what and why."""


@dataclass(slots=True)
class MachineConfig:
    mem_bytes: int
    vcpus: int
    backing: Backing = "anon"

    def validate(self) -> None:
        if self.mem_bytes <= 0 or self.mem_bytes % L.PAGE_SIZE:
            raise MachineError(f"guest memory of {self.mem_bytes} bytes is not a positive multiple of 4 KiB")
        if self.mem_bytes > L.MAX_GUEST_GIB * L.GIB:
            raise MachineError(f"guest memory of {self.mem_bytes >> 20} MiB is over the {L.MAX_GUEST_GIB} GiB this VMM maps")
        if self.mem_bytes < L.DATA_GPA:
            raise MachineError(f"guest memory of {self.mem_bytes >> 10} KiB is below the {L.DATA_GPA >> 20} MiB boot region")
        if not 1 <= self.vcpus <= L.MAX_VCPUS:
            raise MachineError(f"{self.vcpus} vCPUs: this VMM runs 1 to {L.MAX_VCPUS}")


@dataclass(slots=True)
class Machine:
    config: MachineConfig
    kvm: Kvm
    vm: "object"
    memory: GuestMemory
    bus: PioBus
    uart: Uart
    services: GuestServices
    vcpus: list[VcpuThread]
    cpuid: bytes
    msr_indices: list[int]
    started_ns: int = 0
    _closed: bool = field(default=False)

    @classmethod
    def create(cls, config: MachineConfig, *, console: Callable[[str], None] | None = None,
               memory: GuestMemory | None = None) -> Machine:
        """Build the VM with ``config.vcpus`` vCPUs; RAM is made here unless ``memory`` is given
        (a destination registers its RAM with userfaultfd first)."""
        config.validate()
        try:
            kvm = Kvm()
        except KvmError as e:
            raise MachineError(str(e)) from None
        vm = None
        made: GuestMemory | None = None  # RAM made here, freed here if the VM cannot be built
        threads: list[VcpuThread] = []
        try:
            vm = kvm.create_vm()
            if memory is None:
                memory = made = GuestMemory.create(config.mem_bytes, config.backing)
            memory.register(vm)
            vm.create_irqchip()
            vm.create_pit2()
            cpuid = kvm.get_supported_cpuid()
            msr_indices = kvm.get_msr_index_list()
            bus = PioBus()
            uart = Uart(console=console)
            services = GuestServices(config.vcpus)
            bus.add(uart)
            bus.add(services)
            for i in range(config.vcpus):
                vcpu = vm.create_vcpu(i)
                threads.append(VcpuThread(vcpu, memory, bus))
                vcpu.set_cpuid2(cpuid)  # before SREGS: long mode needs the CPUID bits (HOST.md)
        except (KvmError, GuestMemoryError, OSError) as e:
            for t in threads:  # none started: what they hold is closed at once
                t.vcpu.close()
            if vm is not None:
                vm.close()
            kvm.close()
            if made is not None:
                made.close()
            raise MachineError(f"cannot create the VM: {e}") from None
        return cls(config, kvm, vm, memory, bus, uart, services, threads, cpuid, msr_indices)

    # -- booting a workload ---------------------------------------------------------------------
    def boot(self, program: GuestProgram, params: list[L.BootParams]) -> None:
        """Write page tables, GDT, IDT, code and boot parameters; point every vCPU at the entry."""
        if len(params) != len(self.vcpus):
            raise MachineError(f"{len(params)} boot parameter blocks for {len(self.vcpus)} vCPUs")
        mem = self.memory
        mem.write(L.PML4_GPA, struct.pack("<Q", L.PDPT_GPA | PTE_PRESENT | PTE_WRITABLE))
        npd = L.pd_pages(mem.size)
        mem.write(L.PDPT_GPA, b"".join(struct.pack("<Q", (L.PD_GPA + i * L.PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE)
                                       for i in range(npd)))
        large_pages = (mem.size + L.LARGE_PAGE_SIZE - 1) // L.LARGE_PAGE_SIZE
        mem.write(L.PD_GPA, b"".join(struct.pack("<Q", (i * L.LARGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE)
                                     for i in range(large_pages)))
        mem.write(L.GDT_GPA, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))
        mem.write(L.IDT_GPA, _idt(program.exception_entries))
        if len(program.code) > L.CODE_MAX:
            raise MachineError(f"guest code is {len(program.code)} bytes, over the {L.CODE_MAX} the layout holds")
        mem.write(program.code_gpa, program.code)
        for i, (thread, p) in enumerate(zip(self.vcpus, params)):
            mem.write(L.boot_params_gpa(i), p.pack())
            _enter_long_mode(thread, program.entry_gpa, i)

    # -- running --------------------------------------------------------------------------------
    def start(self) -> None:
        self.started_ns = time.monotonic_ns()
        for t in self.vcpus:
            t.start()

    def lower_priority(self) -> None:
        """The vCPU threads at MAX_NICE until resumed (VcpuThread.lower_priority); pause does
        it first, a caller that times the pause may do it before."""
        for t in self.vcpus:
            t.lower_priority()

    def pause(self) -> None:
        self.lower_priority()  # first: no vCPU still in guest code then outranks this thread
        for t in self.vcpus:
            t.request_pause()  # ask and kick all before waiting: they stop in parallel
        for t in self.vcpus:
            t.wait_paused()

    def resume(self) -> None:
        for t in self.vcpus:
            t.resume()

    def stop(self) -> None:
        for t in self.vcpus:
            t.stop(STOP_TIMEOUT_S)

    def failures(self) -> list[str]:
        return [t.error or f"vCPU {t.id} failed" for t in self.vcpus if t.state is VcpuState.FAILED]

    def check(self) -> None:
        """Raise MachineError if a vCPU failed or the guest raised an exception."""
        problems = self.failures()
        for vector, code, rip, cr2 in self.services.exceptions:
            problems.append(f"guest exception vector {vector} (error code {code:#x}) at rip {rip:#x}, cr2 {cr2:#x}")
        if problems:
            raise MachineError("; ".join(problems))

    def run_for(self, seconds: float, poll: float = 0.05) -> None:
        """Let the guest run ``seconds`` (or until it stops or fails)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.services.stop_requested.is_set() or not any(t.alive for t in self.vcpus):
                break
            if self.failures():
                break
            time.sleep(min(poll, max(deadline - time.monotonic(), 0)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop()
        stuck = [t.id for t in self.vcpus if t.alive]
        if stuck:
            # Closing under it would be worse than keeping it: its loop holds its vCPU fd's
            # number, which the next VM's vCPU may get, and its guest's RAM.
            log.error("vCPU thread(s) %s did not stop within %s s: their VM, fds and guest RAM are kept "
                      "(a later close() frees them once they have)", stuck, STOP_TIMEOUT_S)
            self._closed = False
            return
        for t in self.vcpus:
            t.vcpu.close()
        self.vm.close()
        self.kvm.close()
        self.memory.close()


def _idt(entries: tuple[int, ...]) -> bytes:
    out = bytearray(IDT_VECTORS * 16)
    for vector, handler in enumerate(entries):
        low = ((handler & 0xFFFF) | (L.GDT_CODE64_SELECTOR << 16) | (IDT_GATE_INTERRUPT64 << 40)
               | (((handler >> 16) & 0xFFFF) << 48))
        struct.pack_into("<QQ", out, vector * 16, low, handler >> 32)
    return bytes(out)


def _segment(selector: int, seg_type: int, *, long: bool) -> abi.kvm_segment:
    return abi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=selector, type=seg_type, present=1, dpl=0,
                           db=0 if long else 1, s=1, l=1 if long else 0, g=1)


def _enter_long_mode(thread: VcpuThread, entry: int, index: int) -> None:
    vcpu = thread.vcpu
    sregs = vcpu.get_sregs()
    sregs.cs = _segment(L.GDT_CODE64_SELECTOR, SEG_TYPE_CODE_XR_ACCESSED, long=True)
    data = _segment(L.GDT_DATA_SELECTOR, SEG_TYPE_DATA_RW_ACCESSED, long=False)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt.base, sregs.gdt.limit = L.GDT_GPA, len(GDT_ENTRIES) * 8 - 1
    sregs.idt.base, sregs.idt.limit = L.IDT_GPA, IDT_VECTORS * 16 - 1
    sregs.cr0 = abi.X86_CR0_PE | abi.X86_CR0_MP | abi.X86_CR0_ET | abi.X86_CR0_NE | abi.X86_CR0_WP | abi.X86_CR0_AM | abi.X86_CR0_PG
    sregs.cr3 = L.PML4_GPA
    sregs.cr4 = abi.X86_CR4_PAE
    sregs.efer = abi.EFER_LME | abi.EFER_LMA
    vcpu.set_sregs(sregs)
    regs = abi.kvm_regs(rip=entry, rsp=L.stack_top(index), rdi=index, rsi=L.boot_params_gpa(index),
                        rflags=L.ENTRY_RFLAGS)
    vcpu.set_regs(regs)
    # With the in-kernel irqchip every vCPU but the BSP starts in INIT-wait: make it run.
    vcpu.set_mp_state(abi.kvm_mp_state(abi.KVM_MP_STATE_RUNNABLE))


__all__ = ["Machine", "MachineConfig", "MachineError", "VcpuError"]
