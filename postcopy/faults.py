"""Decoding fault exits into "these guest pages are missing", for every way a host reports one.

- This host (no annotated -EFAULT, shadow paging): a data access returns KVM_EXIT_MMIO with the
  faulting GPA; an instruction fetch returns KVM_EXIT_INTERNAL_ERROR (emulation), resolved by
  KVM_TRANSLATE of RIP.
- Upstream kernels with KVM_CAP_MEMORY_FAULT_INFO: KVM_RUN fails with EFAULT and
  exit_reason KVM_EXIT_MEMORY_FAULT, memory_fault.gpa/size.
- Kernels with the 2021 "Deliver VM fault signals to userspace" patch: a SIGBUS queued to the
  vCPU thread (kept blocked there, read with sigtimedwait), si_addr = host virtual address.

After the pages are installed, ``complete`` finishes what KVM could not: an emulated MMIO read
gets its bytes from the now-present RAM, an emulated MMIO write is stored into it.
"""
from __future__ import annotations

import ctypes
import enum
import errno
import signal
from dataclasses import dataclass

from vmm import libc
from vmm.abi import kvm as abi
from vmm.guest.layout import PAGE_SHIFT, PAGE_SIZE
from vmm.kvm import (EXIT_REASON_U32, MMIO_DATA_OFFSET, MMIO_DATA_U64, MMIO_IS_WRITE_U8, MMIO_LEN_U32,
                     MMIO_PHYS_ADDR_U64, Vcpu)
from vmm.memory import GuestMemory
from vmm.vcpu import VcpuThread

X86_MAX_INSTRUCTION = 15
PAGE_MASK = ~(PAGE_SIZE - 1)
KVM_EXIT_MMIO, KVM_EXIT_INTERNAL_ERROR = abi.KVM_EXIT_MMIO, abi.KVM_EXIT_INTERNAL_ERROR
memmove = ctypes.memmove


class FaultKind(enum.IntEnum):
    MMIO = 0  # data read or write, emulated by KVM: this host
    FETCH = 1  # instruction fetch: KVM_EXIT_INTERNAL_ERROR, emulation failure
    MEMORY_FAULT = 2  # upstream KVM_EXIT_MEMORY_FAULT (-EFAULT)
    SIGBUS = 3  # a SIGBUS queued to the vCPU thread (2021 patch)


FAULT_KIND_NAMES = {k: k.name.lower() for k in FaultKind}
MMIO = FaultKind.MMIO  # an enum member read through its class costs a descriptor call


class FaultError(Exception):
    """An exit that looks like a memory fault but cannot be resolved; the message says why."""


@dataclass(slots=True)
class Fault:
    """The pages one exit needs: [first_gpa, first_gpa + npages * PAGE_SIZE)."""

    kind: FaultKind
    gpa: int  # the faulting address itself (for MMIO completion)
    first_gpa: int
    npages: int
    first_page: int = 0  # the page index (GuestMemory.page_index) of first_gpa
    first_hva: int = 0  # the host address of first_gpa
    length: int = 0  # MMIO: bytes accessed
    is_write: bool = False  # MMIO: a write (complete stores it) or a read (complete loads it)
    hva: int = 0  # MMIO: host address of the access


class FaultDecoder:
    """One per vCPU thread: owns the preallocated buffers the decode needs, and the one Fault
    it fills (a decode's answer is valid until the next decode: no object per fault)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.fault = Fault(FaultKind.MMIO, 0, 0, 0)
        self._sigbus = libc.sigset_t.of(signal.SIGBUS)
        self._siginfo = libc.siginfo_t()
        self._zero_timeout = libc.timespec(0, 0)
        # Guest RAM as one region is the usual layout: its bounds, page numbering and host
        # address as plain ints make the decode of every fault exit arithmetic, not region searches.
        self._single = len(memory.regions) == 1
        one = memory.regions[0]
        self._lo, self._hi = (one.gpa, one.gpa + one.size) if self._single else (0, -1)
        self._page_base = one.first_page - (one.gpa >> PAGE_SHIFT)
        self._hva_base = one.hva - one.gpa
        # The one region as qwords, for completing an aligned 8-byte access (the usual one) by
        # index; read only at pages that are present (complete runs after the install).
        self._ram_u64 = memory.view(one.gpa, one.size).cast("Q") if self._single else None
        self._qword_end = one.size - 7 if self._single else 0  # qword_offset: none unless one region
        self.page_base = one.first_page  # the page index of offset 0 (qword_offset's RAM)
        self.hva_base = one.hva

    def in_ram(self, gpa: int, length: int) -> bool:
        if self._lo <= gpa and gpa + length <= self._hi:
            return True
        return not self._single and self.memory.contains(gpa, length)

    def decode(self, thread: VcpuThread, ret: int) -> Fault | None:
        """The fault behind this exit, or None if it is not a missing-page exit."""
        vcpu = thread.vcpu
        if ret < 0:
            run = vcpu.run_struct
            if ret == -errno.EFAULT and run.exit_reason == abi.KVM_EXIT_MEMORY_FAULT:
                mf = run.memory_fault
                return self._span(FaultKind.MEMORY_FAULT, mf.gpa, max(mf.size, 1))
            if ret in (-errno.EFAULT, -errno.EINTR):
                return self._pending_sigbus()
            return None
        reason = vcpu.run_u32[EXIT_REASON_U32]
        if reason == KVM_EXIT_MMIO:
            gpa = vcpu.run_u64[MMIO_PHYS_ADDR_U64]
            length = vcpu.run_u32[MMIO_LEN_U32]
            span = length or 1
            if not (self._lo <= gpa and gpa + span <= self._hi) and not self.in_ram(gpa, span):
                return None  # real MMIO: not ours
            fault = self._fill(MMIO, gpa, span)
            fault.length, fault.is_write = length, vcpu.run_u8[MMIO_IS_WRITE_U8] != 0
            fault.hva = gpa + self._hva_base if self._single else self.memory.hva(gpa, length)
            return fault
        if reason == KVM_EXIT_INTERNAL_ERROR and vcpu.run_struct.internal.suberror == abi.KVM_INTERNAL_ERROR_EMULATION:
            return self._fetch(thread)
        return None

    def qword_offset(self, vcpu: Vcpu) -> int:
        """This host's usual fault, told apart in a few compares: an MMIO exit for an aligned
        8-byte access inside single-region RAM. Its offset in RAM, else -1 (``decode`` then
        says what the exit is). Read only after KVM_RUN returned 0."""
        if vcpu.run_u32[EXIT_REASON_U32] != KVM_EXIT_MMIO or vcpu.run_u32[MMIO_LEN_U32] != 8:
            return -1
        offset = vcpu.run_u64[MMIO_PHYS_ADDR_U64] - self._lo
        if offset & 7 or not 0 <= offset < self._qword_end:
            return -1
        return offset

    def qword_span(self) -> tuple[int, int, memoryview | None]:
        """What qword_offset and complete_qword work with, for the loop that inlines them
        (exit_mode.ExitModeResolver._run): the gpa that offsets count from, the end of the
        offsets qword_offset takes (0, so none, where RAM is not one region), RAM as qwords."""
        return self._lo, self._qword_end, self._ram_u64

    def complete_qword(self, vcpu: Vcpu, offset: int) -> None:
        """``complete`` for the access qword_offset found, its page now present."""
        ram = self._ram_u64
        if vcpu.run_u8[MMIO_IS_WRITE_U8]:
            ram[offset >> 3] = vcpu.run_u64[MMIO_DATA_U64]  # type: ignore[index]
        else:
            vcpu.run_u64[MMIO_DATA_U64] = ram[offset >> 3]  # type: ignore[index]

    def complete(self, thread: VcpuThread, fault: Fault) -> None:
        """Finish the access KVM handed back, once its pages are present (MMIO only): a read
        gets its bytes from the now-present RAM, a write is stored into it."""
        if fault.kind is not MMIO:
            return  # the instruction is retried on re-entry
        vcpu = thread.vcpu
        if fault.length == 8 and not fault.gpa & 7 and self._ram_u64 is not None:
            self.complete_qword(vcpu, fault.gpa - self._lo)
            return
        data = vcpu.run_address + MMIO_DATA_OFFSET
        if fault.is_write:
            memmove(fault.hva, data, fault.length)
        else:
            memmove(data, fault.hva, fault.length)

    def _span(self, kind: FaultKind, gpa: int, length: int) -> Fault:
        if not self.in_ram(gpa, length):
            raise FaultError(f"{kind.name} fault at gpa {gpa:#x}+{length} is outside guest RAM")
        return self._fill(kind, gpa, length)

    def _fill(self, kind: FaultKind, gpa: int, length: int) -> Fault:
        """The pages [gpa, gpa + length) touches (regions are page-aligned: all in RAM)."""
        f = self.fault
        first = gpa & PAGE_MASK
        f.kind, f.gpa, f.first_gpa = kind, gpa, first
        f.npages = ((((gpa + length - 1) & PAGE_MASK) - first) >> PAGE_SHIFT) + 1
        if self._single:
            f.first_page, f.first_hva = (first >> PAGE_SHIFT) + self._page_base, first + self._hva_base
        else:
            f.first_page, f.first_hva = self.memory.page_index(first), self.memory.hva(first)
        return f

    def _fetch(self, thread: VcpuThread) -> Fault | None:
        rip = thread.vcpu.get_regs().rip
        tr = thread.vcpu.translate(rip)
        if not tr.valid:
            return None
        fault = self._span(FaultKind.FETCH, tr.physical_address, 1)
        # An instruction may cross into the next page: take it too when it maps to RAM.
        end = thread.vcpu.translate(rip + X86_MAX_INSTRUCTION - 1)
        if end.valid and (end.physical_address & PAGE_MASK) == fault.first_gpa + PAGE_SIZE \
                and self.in_ram(end.physical_address & PAGE_MASK, PAGE_SIZE):
            fault.npages = 2
        return fault

    def _pending_sigbus(self) -> Fault | None:
        got = libc.sigtimedwait(ctypes.byref(self._sigbus), ctypes.byref(self._siginfo), ctypes.byref(self._zero_timeout))
        if got != signal.SIGBUS:
            return None
        hva = self._siginfo.si_addr
        gpa = self.memory.gpa_of_hva(hva)
        if gpa is None:
            raise FaultError(f"SIGBUS at host address {hva:#x}, outside guest RAM (code {self._siginfo.si_code})")
        return self._span(FaultKind.SIGBUS, gpa, 1)
