"""The eager set: guest pages the destination must have before any vCPU runs there.

On a shadow-paging host a missing page-table page cannot be caught (HOST.md: KVM injects a
#PF into the guest), so every page-table page reachable from CR3 goes eagerly, together with
the pages the first instructions need at once: code under RIP, the stack under RSP, the GDT
and the IDT. Found by a real x86-64 4-level walk over source memory (all of it present here).
"""
from __future__ import annotations

import re
import struct
from typing import Final

from vmm.abi import kvm as abi
from vmm.guest.layout import PAGE_SIZE
from vmm.memory import GuestMemory

__all__ = ["EagerError", "eager_pages", "page_tables", "translate"]

# Page-table entry bits and address masks (SDM vol. 3, 4.5).
PTE_PRESENT: Final = 1 << 0
PTE_PAGE_SIZE: Final = 1 << 7  # in a PDPTE: 1 GiB page; in a PDE: 2 MiB page
PTE_ADDR_MASK: Final = 0x000F_FFFF_FFFF_F000  # bits 51:12, the next table or a 4 KiB page
PTE_ADDR_MASK_1G: Final = 0x000F_FFFF_C000_0000  # bits 51:30
PTE_ADDR_MASK_2M: Final = 0x000F_FFFF_FFE0_0000  # bits 51:21
CR3_ADDR_MASK: Final = PTE_ADDR_MASK  # the low 12 bits are PCID or PWT/PCD
X86_CR4_LA57: Final = 1 << 12

ENTRIES_PER_TABLE: Final = PAGE_SIZE // 8
ENTRY_INDEX_MASK: Final = ENTRIES_PER_TABLE - 1
PAGE_MASK: Final = ~(PAGE_SIZE - 1)
# Linear-address bits that index each level, from the PML4 (level 4) down to the PT (level 1).
LEVEL_SHIFT: Final = {4: 39, 3: 30, 2: 21, 1: 12}
CANONICAL_BITS: Final = 48

X86_MAX_INSTRUCTION: Final = 15
PUSH_SIZE: Final = 8  # the next push in 64-bit mode writes RSP-8

_ENTRY: Final = struct.Struct("<Q")
PTE_SIZE: Final = _ENTRY.size
# An entry's low byte (bytes.translate table) -> 1 where the walk follows it (present, PS clear:
# a leaf in a PDPTE or PDE, reserved in a PML4E), else 0. A table is scanned through its 512 low
# bytes at C speed, so only the entries followed cost Python steps: a 4 GiB guest mapped with
# 2 MiB pages has four PDs of 512 leaves each, all stepped over (this runs in the downtime).
_FOLLOWED: Final = bytes(1 if b & (PTE_PRESENT | PTE_PAGE_SIZE) == PTE_PRESENT else 0 for b in range(256))
_FOLLOW: Final = re.compile(b"\x01")


class EagerError(Exception):
    """The guest's paging state cannot be walked; the message names the register or table."""


def _check_table(memory: GuestMemory, gpa: int, what: str) -> None:
    if not memory.contains(gpa, PAGE_SIZE):
        raise EagerError(f"{what} at gpa {gpa:#x} is outside guest RAM "
                         f"({', '.join(f'[{r.gpa:#x}, {r.end:#x})' for r in memory.regions)})")


def page_tables(memory: GuestMemory, cr3: int) -> set[int]:
    """Every page-table page reachable from `cr3` (PML4, PDPTs, PDs, PTs), as page GPAs.

    Non-present entries are skipped; 1 GiB and 2 MiB entries are leaves (PS in a PML4E is
    reserved: the CPU faults on it, so it leads nowhere either). A table is walked once
    per level it is reached at, so recursive mappings terminate and are still followed exactly.
    """
    pml4 = cr3 & CR3_ADDR_MASK
    _check_table(memory, pml4, f"the PML4 (CR3 {cr3:#x})")
    tables = {pml4}
    seen: set[tuple[int, int]] = {(pml4, 4)}
    pending = [(pml4, 4)]
    while pending:
        table, level = pending.pop()
        raw = memory.read(table, PAGE_SIZE)
        for followed in _FOLLOW.finditer(raw[::PTE_SIZE].translate(_FOLLOWED)):
            index = followed.start()
            (entry,) = _ENTRY.unpack_from(raw, index * PTE_SIZE)
            child = entry & PTE_ADDR_MASK
            _check_table(memory, child, f"the level-{level - 1} table named by entry {index} "
                                        f"of the level-{level} table at gpa {table:#x} (entry {entry:#x})")
            tables.add(child)
            if level > 2 and (child, level - 1) not in seen:
                seen.add((child, level - 1))
                pending.append((child, level - 1))
    return tables


def translate(memory: GuestMemory, cr3: int, linear: int) -> int | None:
    """The guest-physical address of `linear` under the 4-level tables at `cr3`, or None when
    it is not canonical or not mapped. The result may lie outside guest RAM (MMIO).

    A PDPTE with PS set is taken as a 1 GiB page even where the vCPU's CPUID lacks pdpe1gb
    (then the guest faults on it instead): that can only add a page to the eager set.
    """
    linear &= (1 << 64) - 1
    top = linear >> (CANONICAL_BITS - 1)
    if top not in (0, (1 << (64 - CANONICAL_BITS + 1)) - 1):
        return None
    table = cr3 & CR3_ADDR_MASK
    _check_table(memory, table, f"the PML4 (CR3 {cr3:#x})")
    for level in (4, 3, 2, 1):
        index = (linear >> LEVEL_SHIFT[level]) & ENTRY_INDEX_MASK
        (entry,) = _ENTRY.unpack(memory.read(table + index * 8, 8))
        if not entry & PTE_PRESENT:
            return None
        if level == 4 and entry & PTE_PAGE_SIZE:
            return None  # reserved bit: the CPU would fault
        if level == 3 and entry & PTE_PAGE_SIZE:
            return (entry & PTE_ADDR_MASK_1G) | (linear & ((1 << 30) - 1))
        if level == 2 and entry & PTE_PAGE_SIZE:
            return (entry & PTE_ADDR_MASK_2M) | (linear & ((1 << 21) - 1))
        if level == 1:
            return (entry & PTE_ADDR_MASK) | (linear & (PAGE_SIZE - 1))
        table = entry & PTE_ADDR_MASK
        _check_table(memory, table, f"the level-{level - 1} table named by entry {index} "
                                    f"of the level-{level} table (entry {entry:#x})")
    raise AssertionError("unreachable: level 1 always returns")


def _paging_mode(sregs: abi.kvm_sregs) -> bool:
    """True for 4-level long-mode paging, False for paging off; EagerError for anything else."""
    if not sregs.cr0 & abi.X86_CR0_PG:
        return False
    if not sregs.efer & abi.EFER_LMA:
        raise EagerError(f"32-bit paging (CR0 {sregs.cr0:#x}, EFER {sregs.efer:#x}) is not supported: "
                         "only 4-level long-mode guests are migrated")
    if sregs.cr4 & X86_CR4_LA57:
        raise EagerError(f"5-level paging (CR4 {sregs.cr4:#x}) is not supported")
    return True


def eager_pages(memory: GuestMemory, regs: abi.kvm_regs, sregs: abi.kvm_sregs) -> set[int]:
    """Page-aligned GPAs one paused vCPU needs before it runs: every page-table page reachable
    from CR3, and the pages under RIP..RIP+15, RSP and RSP-8, the GDT and the IDT.

    Linear addresses that do not translate, or translate outside guest RAM, add nothing.
    """
    paging = _paging_mode(sregs)
    cr3 = sregs.cr3
    pages = page_tables(memory, cr3) if paging else set()
    # In 64-bit mode CS and SS bases are ignored (treated as 0).
    long_code = bool(sregs.cs.l)
    rip = regs.rip + (0 if long_code else sregs.cs.base)
    rsp = regs.rsp + (0 if long_code else sregs.ss.base)
    linear = [rip, rip + X86_MAX_INSTRUCTION, rsp, rsp - PUSH_SIZE]
    for table in (sregs.gdt, sregs.idt):
        first = table.base & PAGE_MASK
        linear.extend(range(first, table.base + table.limit + 1, PAGE_SIZE))
    for address in linear:
        gpa = translate(memory, cr3, address) if paging else address & ((1 << 64) - 1)
        if gpa is not None and memory.contains(gpa & PAGE_MASK, PAGE_SIZE):
            pages.add(gpa & PAGE_MASK)
    return pages
