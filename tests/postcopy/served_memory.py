"""Guest RAM with a known pattern and a header that describes it: what a page server resumed
from a state directory serves, without a guest (fixture ``served`` in conftest.py)."""
from __future__ import annotations

from dataclasses import dataclass

from proto import PAGE_SIZE, MemoryRegion, MigrationHeader, VcpuState, VmState
from vmm.memory import GuestMemory

SERVED_BYTES = 4 << 20
SERVED_TOKEN = "served-token"


@dataclass(slots=True)
class Served:
    memory: GuestMemory
    header: MigrationHeader


def served_header(memory: GuestMemory, migration_id: str = "mig-served") -> MigrationHeader:
    vcpu = VcpuState(id=0, regs=b"r" * 144, sregs=b"s" * 312, fpu=b"", xsave=b"", xcrs=b"", lapic=b"",
                     events=b"", mp_state=b"", debugregs=b"", cpuid=b"", msrs=b"")
    return MigrationHeader(
        migration_id=migration_id, page_size=PAGE_SIZE,
        regions=tuple(MemoryRegion(r.gpa, r.size) for r in memory.regions), vcpus=(vcpu,),
        vm_state=VmState(b"", [], b""), devices={}, eager=(),
        paused_at_ns=1, boot_id="test-boot", workload={"name": "pattern"})


def fill_pattern(memory: GuestMemory) -> None:
    """Page i holds byte (i % 251) + 1 everywhere, but every 8th page is zero."""
    for page in range(memory.pages):
        if page % 8:
            memory.write(page * PAGE_SIZE, bytes([page % 251 + 1]) * PAGE_SIZE)
