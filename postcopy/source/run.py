"""The source side's pieces around the page server: boot a guest to serve, and summarise what
was served. The VMM service (postcopy/api/service.py) runs the source side with them."""
from __future__ import annotations

from typing import Any

from postcopy.source.page_server import PageServer
from vmm.guest import workloads
from vmm.guest.layout import DATA_GPA, PAGE_SIZE
from vmm.machine import Machine, MachineConfig
from vmm.memory import GuestMemory

__all__ = ["boot_memtouch", "boot_workload", "server_summary"]

WORKLOAD = "memtouch"


def boot_memtouch(mem_bytes: int, vcpus: int, seed: int, *, ram_path: str | None = None,
                  prefill: float = 0.0) -> tuple[Machine, dict[str, int | str]]:
    """A started memtouch guest, and the workload record for its header."""
    return boot_workload(WORKLOAD, mem_bytes, vcpus, seed, ram_path=ram_path, prefill=prefill)


def boot_workload(name: str, mem_bytes: int, vcpus: int, seed: int, *, ram_path: str | None = None,
                  prefill: float = 0.0) -> tuple[Machine, dict[str, int | str]]:
    """A started guest running workload ``name`` on memfd-backed RAM (or on the file
    ``ram_path``, which outlives this process: a state directory's), and the workload record
    for its header.

    ``prefill`` (memtouch only): the fraction of the data region written with filler bytes
    before the guest starts, so a benchmark can migrate a mostly written guest without waiting
    for memtouch's own fill (~30 k pages/s per vCPU here). memtouch's fill rewrites its samples
    over it before it checks any page, and never checks the other qwords, so the filler is
    harmless; touch's check would see it, so it is refused there."""
    if not 0.0 <= prefill <= 1.0:
        raise workloads.WorkloadError(f"prefill must be a fraction from 0 to 1, not {prefill!r}")
    if prefill and name != WORKLOAD:
        raise workloads.WorkloadError(f"prefill applies only to {WORKLOAD}, not {name}")
    program, params = workloads.plan(name, mem_bytes, vcpus, seed)
    memory = GuestMemory.create(mem_bytes, "file", path=ram_path) if ram_path else None
    machine = Machine.create(MachineConfig(mem_bytes, vcpus, backing="memfd"), memory=memory)
    try:
        _prefill(machine, prefill)
        machine.boot(program, params)
        machine.start()
    except BaseException:
        machine.close()
        raise
    workload: dict[str, int | str] = {"name": name, "seed": seed, "mem_bytes": mem_bytes, "vcpus": vcpus}
    return machine, workload


PREFILL_BYTE = 0xA5
PREFILL_CHUNK = 1 << 20


def _prefill(machine: Machine, fraction: float) -> None:
    memory = machine.memory
    end = DATA_GPA + int((memory.size - DATA_GPA) * fraction) // PAGE_SIZE * PAGE_SIZE
    chunk = bytes([PREFILL_BYTE]) * PREFILL_CHUNK
    for gpa in range(DATA_GPA, end, PREFILL_CHUNK):
        memory.write(gpa, chunk[:min(PREFILL_CHUNK, end - gpa)])


def server_summary(server: PageServer) -> dict[str, Any]:
    """What a completed page server served, and what the destination said it received."""
    stats = server.stats()
    header = server.header
    assert header is not None
    return {
        "migration_id": server.migration_id,
        "state": stats["state"],
        "guest_pages": header.total_pages,
        "eager_pages": sum(run.npages for run in header.eager),
        "zero_pages_in_map": stats["zero_map_pages"],
        "header_bytes": stats["header_bytes"],
        "pages_data": stats["pages_data"],
        "pages_zero": stats["pages_zero"],
        "batch_bytes": stats["batch_bytes"],
        "requests": stats["requests"],
        "errors": stats["errors"],
        "ws_connections": stats["ws_connections"],
        "pause_to_complete_s": stats.get("pause_to_complete_s"),
        "destination_stats": dict(server.complete_stats),
    }
