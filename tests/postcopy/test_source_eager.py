"""The eager set and the page walk, on a real paused memtouch guest and on hand-built tables,
checked against KVM's own walk (KVM_TRANSLATE)."""
from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator

import pytest

from postcopy.source.eager import (
    PTE_PAGE_SIZE,
    PTE_PRESENT,
    EagerError,
    eager_pages,
    page_tables,
    translate,
)
from postcopy.source.run import boot_memtouch
from vmm.abi import kvm as abi
from vmm.guest import layout as L
from vmm.machine import Machine
from vmm.memory import GuestMemory

MiB = 1 << 20
GUEST_BYTES = 32 * MiB
PTE_RW = 1 << 1
TABLE = PTE_PRESENT | PTE_RW


@pytest.fixture(scope="module")
def paused_guest() -> Iterator[Machine]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable: this test runs a real KVM guest")
    machine, _ = boot_memtouch(GUEST_BYTES, 2, seed=7)
    try:
        time.sleep(0.3)
        machine.pause()
        yield machine
    finally:
        machine.close()


def _page(address: int) -> int:
    return address & ~(L.PAGE_SIZE - 1)


def test_eager_set_holds_page_tables_code_stack_gdt_and_idt(paused_guest: Machine) -> None:
    memory = paused_guest.memory
    for thread in paused_guest.vcpus:
        regs, sregs = thread.vcpu.get_regs(), thread.vcpu.get_sregs()
        eager = eager_pages(memory, regs, sregs)
        expected = {L.PML4_GPA, L.PDPT_GPA, L.PD_GPA, L.GDT_GPA, L.IDT_GPA,
                    _page(regs.rip), _page(regs.rip + 15), _page(regs.rsp), _page(regs.rsp - 8)}
        assert expected <= eager, f"vCPU {thread.id}: missing {sorted(map(hex, expected - eager))}"
        assert all(gpa % L.PAGE_SIZE == 0 and memory.contains(gpa, L.PAGE_SIZE) for gpa in eager)
        # Identity map with 2 MiB pages: exactly PML4, PDPT and one PD page are tables.
        assert page_tables(memory, sregs.cr3) == {L.PML4_GPA, L.PDPT_GPA, L.PD_GPA}
        assert all(gpa < L.DATA_GPA for gpa in eager)


def test_translate_agrees_with_kvm_translate_on_the_booted_guest(paused_guest: Machine) -> None:
    memory = paused_guest.memory
    vcpu = paused_guest.vcpus[0].vcpu
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    addresses = [regs.rip, regs.rsp - 8, sregs.gdt.base, sregs.idt.base + 0xFFF, L.DATA_GPA + 0x1234,
                 GUEST_BYTES - 1, GUEST_BYTES, 1 << 30, (1 << 47) - 1]
    for address in addresses:
        kvm = vcpu.translate(address)
        ours = translate(memory, sregs.cr3, address)
        assert ours == (kvm.physical_address if kvm.valid else None), hex(address)
    assert translate(memory, sregs.cr3, 1 << 47) is None  # not canonical


def _qwords(memory: GuestMemory, gpa: int, entries: dict[int, int]) -> None:
    for index, entry in entries.items():
        memory.write(gpa + index * 8, struct.pack("<Q", entry))


@pytest.mark.usefixtures("kvm_available")
def test_walk_handles_4k_2m_and_1g_pages_like_kvm() -> None:
    """Hand-built tables in a second hierarchy: every kind of leaf, non-present entries, a
    table reached twice; our walk and KVM_TRANSLATE agree on every probe."""
    machine, _ = boot_memtouch(4 * MiB, 1, seed=1)
    try:
        machine.pause()
        memory = machine.memory
        pml4, pdpt, pd, pt = 0x100000, 0x101000, 0x102000, 0x103000
        for table in (pml4, pdpt, pd, pt):
            memory.write(table, bytes(L.PAGE_SIZE))
        # 5: not present; 6: PS in a PML4E is reserved, not followed
        _qwords(memory, pml4, {0: pdpt | TABLE, 3: pdpt | TABLE, 5: 0x7000,
                               6: 0x104000 | TABLE | PTE_PAGE_SIZE})
        _qwords(memory, pdpt, {0: pd | TABLE, 1: 0 | TABLE | PTE_PAGE_SIZE})  # 1: a 1 GiB page at 0
        _qwords(memory, pd, {0: pt | TABLE, 1: 0x200000 | TABLE | PTE_PAGE_SIZE})
        _qwords(memory, pt, {0: 0x5000 | TABLE, 1: 0x3FF000 | TABLE, 2: 0x6000})  # 2: not present
        vcpu = machine.vcpus[0].vcpu
        sregs = vcpu.get_sregs()
        sregs.cr3 = pml4
        vcpu.set_sregs(sregs)
        probes = [0x0, 0x123, 0x1FFF, 0x2000, 0x200000 + 0xABC, 0x3FFFFF, 0x400000,
                  (3 << 39) + 0x1008, 5 << 39, (5 << 39) + 0x1000]
        for address in probes:
            kvm = vcpu.translate(address)
            expected = kvm.physical_address if kvm.valid else None
            assert translate(memory, pml4, address) == expected, hex(address)
        # The 1 GiB page: KVM maps it only where the vCPU's CPUID offers pdpe1gb (this host's
        # does not); our walk always takes it as a leaf, which at worst adds a page to the set.
        gib = vcpu.translate((1 << 30) + 0x345678)
        assert translate(memory, pml4, (1 << 30) + 0x345678) == 0x345678
        assert not gib.valid or gib.physical_address == 0x345678
        assert page_tables(memory, pml4) == {pml4, pdpt, pd, pt}
        regs = abi.kvm_regs(rip=0x1000, rsp=0x200010)  # code in the PT's page 1, stack in the 2 MiB page
        eager = eager_pages(memory, regs, sregs)
        assert {pml4, pdpt, pd, pt, 0x3FF000, 0x200000} <= eager
        assert 0x6000 not in eager  # non-present PTE: nothing to send
    finally:
        machine.close()


def test_tables_outside_ram_are_an_eager_error() -> None:
    memory = GuestMemory.create(4 * MiB)
    try:
        sregs = abi.kvm_sregs(cr0=abi.X86_CR0_PG | abi.X86_CR0_PE, cr4=abi.X86_CR4_PAE,
                              efer=abi.EFER_LME | abi.EFER_LMA, cr3=64 * MiB)
        sregs.cs.l = 1
        with pytest.raises(EagerError, match="PML4.*outside guest RAM"):
            eager_pages(memory, abi.kvm_regs(), sregs)
        sregs.cr3 = 0x1000
        _qwords(memory, 0x1000, {0: (1 << 40) | TABLE})
        with pytest.raises(EagerError, match="level-3 table.*outside guest RAM"):
            eager_pages(memory, abi.kvm_regs(), sregs)
        with pytest.raises(EagerError, match="outside guest RAM"):
            translate(memory, 0x1000, 0x1000)
    finally:
        memory.close()


def test_32_bit_paging_is_refused_and_paging_off_is_identity() -> None:
    memory = GuestMemory.create(4 * MiB)
    try:
        regs = abi.kvm_regs(rip=0x5123, rsp=0x9000)
        with pytest.raises(EagerError, match="32-bit paging"):
            eager_pages(memory, regs, abi.kvm_sregs(cr0=abi.X86_CR0_PG | abi.X86_CR0_PE))
        flat = abi.kvm_sregs(cr0=abi.X86_CR0_PE)
        assert eager_pages(memory, regs, flat) == {0x0, 0x5000, 0x8000, 0x9000}  # GDT/IDT at 0
    finally:
        memory.close()
