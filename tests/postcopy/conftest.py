"""Fixtures for page-server tests that need no guest: guest RAM with a known pattern and a
header that describes it (what a resumed page server serves)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

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
        vm_state=VmState(b"", [], b""), devices={}, eager=(), zero_bitmap=bytes((memory.pages + 7) // 8),
        paused_at_ns=1, boot_id="test-boot", workload={"name": "pattern"})


@pytest.fixture
def served() -> Iterator[Served]:
    """4 MiB of guest RAM: page i holds byte (i % 251) + 1 everywhere, but every 8th page is zero."""
    memory = GuestMemory.create(SERVED_BYTES, "anon")
    for page in range(memory.pages):
        if page % 8:
            memory.write(page * PAGE_SIZE, bytes([page % 251 + 1]) * PAGE_SIZE)
    try:
        yield Served(memory, served_header(memory))
    finally:
        memory.close()
