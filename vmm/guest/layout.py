"""Guest-physical layout shared by the VMM and the guest workloads it assembles.

Everything the guest needs before its first data access (page tables, GDT, IDT, stacks, code,
boot parameters) lives below ``DATA_GPA``, so the eager set of a migration is a handful of
low pages and no page-table page can ever be missing on a shadow-paging host (HOST.md).
The guest never writes to anything below ``DATA_GPA`` except its own stack.
"""
from __future__ import annotations

from dataclasses import dataclass

PAGE_SIZE = 4096
PAGE_SHIFT = 12
LARGE_PAGE_SIZE = 2 << 20  # identity map with 2 MiB pages: one PD page maps 1 GiB
GIB = 1 << 30

PML4_GPA = 0x1000
PDPT_GPA = 0x2000
PD_GPA = 0x3000  # PD pages, one per GiB of guest RAM
MAX_GUEST_GIB = 16  # PD pages 0x3000..0x12fff
GDT_GPA = 0x13000
IDT_GPA = 0x14000
BOOT_PARAMS_GPA = 0x15000  # one BootParams block of BOOT_PARAMS_SIZE bytes per vCPU
BOOT_PARAMS_SIZE = 64
STACKS_GPA = 0x20000  # one STACK_SIZE stack per vCPU; vCPU i's RSP starts at its top
STACK_SIZE = 0x1000
MAX_VCPUS = 32
CODE_GPA = 0x40000  # workload code, at most CODE_MAX bytes
CODE_MAX = 0x40000
DATA_GPA = 0x200000  # first byte a workload may use as data (its first 2 MiB page is all data)

# Segment selectors in our GDT (null, code64, data).
GDT_CODE64_SELECTOR = 0x08
GDT_DATA_SELECTOR = 0x10

# The entry ABI: vCPU i starts at the workload's entry point with
#   rdi = vCPU index, rsi = gpa of its BootParams block, rsp = top of its stack,
# interrupts disabled (rflags = 0x2), paging on, 64-bit code segment.
ENTRY_RFLAGS = 0x2


@dataclass(slots=True, frozen=True)
class BootParams:
    """Per-vCPU parameters, written at BOOT_PARAMS_GPA + i * BOOT_PARAMS_SIZE as 8 qwords."""

    data_gpa: int  # first page of this vCPU's slice
    npages: int  # pages in the slice
    first_pfn: int  # data_gpa >> PAGE_SHIFT, mixed into the pattern so a misplaced page fails
    gen_gpa: int  # this slice's generation table: npages qwords (memtouch only)
    seed: int
    report_every: int  # pages between two GS_REPORTs
    flags: int  # workload-specific (touch: TOUCH_WRITE)
    reserved: int = 0

    def pack(self) -> bytes:
        import struct

        return struct.pack(
            "<8Q", self.data_gpa, self.npages, self.first_pfn, self.gen_gpa, self.seed,
            self.report_every, self.flags, self.reserved,
        )


def boot_params_gpa(vcpu: int) -> int:
    return BOOT_PARAMS_GPA + vcpu * BOOT_PARAMS_SIZE


def stack_top(vcpu: int) -> int:
    return STACKS_GPA + (vcpu + 1) * STACK_SIZE


def pd_pages(guest_bytes: int) -> int:
    """PD pages needed to identity-map ``guest_bytes`` with 2 MiB pages."""
    return (guest_bytes + GIB - 1) // GIB
