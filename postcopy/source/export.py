"""Switchover on the source: pause the guest, capture its state, and build the MigrationHeader
(vCPU/VM/device state, the eager pages). Everything in export() is downtime. The zero map
(zero_map) is built after it, when the destination asks, its guest already running: its cost
grows with the guest (one lseek and mincore per data extent), the header's does not.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from postcopy.source.eager import EagerError, eager_pages
from proto import PAGE_SIZE, MemoryRegion, MigrationHeader, PageRun, ProtoError, ZeroMap
from proto.version import MAX_EAGER_BYTES
from vmm.abi import kvm as abi
from vmm.machine import Machine, MachineError
from vmm.memory import RESIDENT_BIT as RESIDENT, GuestMemory
from vmm.state import StateError, capture
from vmm.vcpu import VcpuError

__all__ = ["ExportError", "coalesce", "export", "read_boot_id", "zero_bitmap", "zero_map"]

BOOT_ID_PATH: Final = Path("/proc/sys/kernel/random/boot_id")
# bytes.translate tables, one per bit of a bitmap byte: a resident_pages() byte -> that bit
# where the page is zero (never resident), else 0.
_ZERO_BIT: Final = tuple(bytes(0 if byte & RESIDENT else 1 << bit for byte in range(256)) for bit in range(8))


class ExportError(Exception):
    """The guest could not be paused or its state not exported; the message says which part."""


def read_boot_id() -> str:
    return BOOT_ID_PATH.read_text().strip()


def zero_bitmap(memory: GuestMemory, eager: Iterable[int] = ()) -> bytes:
    """One bit per guest page over all regions in order, LSB first: set where the host never had
    the page (so it is all zeros); the pages in `eager` are never marked."""
    resident = memory.resident_pages()
    npages = len(resident)
    resident += bytes([RESIDENT]) * (-npages % 8)  # padding bits: not zero pages
    # Page 8k+b is bit b of byte k: every 8th byte from b, translated to bit b, ORed together
    # (a few C-level passes over the map, no Python loop per page; it runs in the downtime).
    bits = 0
    for bit, table in enumerate(_ZERO_BIT):
        bits |= int.from_bytes(resident[bit::8].translate(table), "little")
    bitmap = bytearray(bits.to_bytes(len(resident) // 8, "little"))
    for gpa in eager:
        index = memory.page_index(gpa)
        bitmap[index >> 3] &= ~(1 << (index & 7)) & 0xFF
    return bytes(bitmap[: (npages + 7) // 8])


def zero_map(memory: GuestMemory, header: MigrationHeader) -> ZeroMap:
    """The zero map of the paused guest `header` was exported from (its eager pages unmarked).
    Exact whatever the time it is built: the guest no longer writes here."""
    eager = (run.gpa + i * PAGE_SIZE for run in header.eager for i in range(run.npages))
    return ZeroMap(header.migration_id, zero_bitmap(memory, eager))


def coalesce(memory: GuestMemory, pages: Iterable[int]) -> list[PageRun]:
    """Eager pages as PageRuns of contiguous pages, each inside one region, sorted by gpa."""
    runs: list[PageRun] = []
    start = end = -1
    for gpa in sorted(pages):
        grown = end + PAGE_SIZE - start
        if gpa == end and grown <= MAX_EAGER_BYTES and memory.contains(start, grown):
            end += PAGE_SIZE
            continue
        if start >= 0:
            runs.append(PageRun(start, memory.read(start, end - start)))
        start, end = gpa, gpa + PAGE_SIZE
    if start >= 0:
        runs.append(PageRun(start, memory.read(start, end - start)))
    return runs


def export(machine: Machine, migration_id: str, workload: dict[str, int | str]) -> MigrationHeader:
    """Pause `machine` and return the header the destination resumes it from.

    The vCPUs stay paused: from here on the source only serves pages.
    """
    machine.lower_priority()  # the guest still runs: not downtime
    paused_at_ns = time.monotonic_ns()
    try:
        machine.pause()
    except VcpuError as error:
        raise ExportError(f"cannot pause the guest: {error}") from None
    try:
        machine.check()
        vcpus, vm_state, devices = capture(machine)
        memory = machine.memory
        eager: set[int] = set()
        for state in vcpus:
            regs = abi.kvm_regs.from_buffer_copy(state.regs)
            sregs = abi.kvm_sregs.from_buffer_copy(state.sregs)
            try:
                eager |= eager_pages(memory, regs, sregs)
            except EagerError as error:
                raise ExportError(f"vCPU {state.id}: {error}") from None
        return MigrationHeader(
            migration_id=migration_id,
            page_size=PAGE_SIZE,
            regions=tuple(MemoryRegion(r.gpa, r.size) for r in memory.regions),
            vcpus=tuple(vcpus),
            vm_state=vm_state,
            devices=devices,
            eager=tuple(coalesce(memory, eager)),
            paused_at_ns=paused_at_ns,
            boot_id=read_boot_id(),
            workload=workload,
        )
    except (MachineError, StateError, ProtoError, OSError) as error:
        raise ExportError(f"cannot export the guest: {error}") from None
