"""The source side of a migration, end to end: boot a memtouch guest, serve it, release it.

``run_source`` is what the command line and the tests call; ``serve`` runs it on uvloop.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

import uvloop

from postcopy.source.page_server import MigrationState, PageServer
from vmm.guest import workloads
from vmm.guest.layout import DATA_GPA, PAGE_SIZE
from vmm.machine import Machine, MachineConfig

__all__ = ["SourceError", "boot_memtouch", "run_source", "serve"]

log = logging.getLogger("postcopy.source.run")
WORKLOAD = "memtouch"


class SourceError(Exception):
    """The source could not hand its guest over; the message says at which step."""


def boot_memtouch(mem_bytes: int, vcpus: int, seed: int, *, prefill: float = 0.0) -> tuple[Machine, dict[str, int | str]]:
    """A started memtouch guest on memfd-backed RAM, and the workload record for its header.

    ``prefill``: the fraction of the data region written with filler bytes before the guest
    starts, so a benchmark can migrate a mostly written guest without waiting for memtouch's
    own fill (~30 k pages/s per vCPU here). memtouch's fill rewrites its samples over it before
    it checks any page, and never checks the other qwords, so the filler is harmless."""
    program, params = workloads.plan(WORKLOAD, mem_bytes, vcpus, seed)
    machine = Machine.create(MachineConfig(mem_bytes, vcpus, backing="memfd"))
    try:
        _prefill(machine, prefill)
        machine.boot(program, params)
        machine.start()
    except BaseException:
        machine.close()
        raise
    workload: dict[str, int | str] = {"name": WORKLOAD, "seed": seed, "mem_bytes": mem_bytes, "vcpus": vcpus}
    return machine, workload


async def run_source(mem_bytes: int, vcpus: int, *, host: str, port: int, token: str, seed: int,
                     warmup_s: float, on_ready: Callable[[str], None] | None = None,
                     timeout_s: float | None = None, prefill: float = 0.0) -> dict[str, Any]:
    """Boot the guest, let it run `warmup_s`, announce the page server's URL with `on_ready`,
    then serve until the destination sends Complete (or `timeout_s` passes: SourceError).

    The guest is released (its RAM unmapped) only after the server has closed every socket.
    """
    machine, workload = boot_memtouch(mem_bytes, vcpus, seed, prefill=prefill)
    migration_id = f"mig-{secrets.token_hex(8)}"
    try:
        async with PageServer(machine, token=token, migration_id=migration_id, workload=workload) as server:
            url = await server.start(host, port)
            log.info("page server for %s at %s; guest warming up %.1f s", migration_id, url, warmup_s)
            await asyncio.sleep(warmup_s)
            if on_ready is not None:
                on_ready(url)
            try:
                state = await asyncio.wait_for(server.wait(), timeout_s)
            except TimeoutError:
                raise SourceError(f"migration {migration_id}: no Complete within {timeout_s} s "
                                  f"(state {server.state.value})") from None
            if state is not MigrationState.COMPLETED:
                raise SourceError(f"migration {migration_id} ended {state.value}: {server.failure}")
            summary = _summary(server)
    finally:
        machine.close()
    return summary


PREFILL_BYTE = 0xA5
PREFILL_CHUNK = 1 << 20


def _prefill(machine: Machine, fraction: float) -> None:
    memory = machine.memory
    end = DATA_GPA + int((memory.size - DATA_GPA) * min(max(fraction, 0.0), 1.0)) // PAGE_SIZE * PAGE_SIZE
    chunk = bytes([PREFILL_BYTE]) * PREFILL_CHUNK
    for gpa in range(DATA_GPA, end, PREFILL_CHUNK):
        memory.write(gpa, chunk[:min(PREFILL_CHUNK, end - gpa)])


def _summary(server: PageServer) -> dict[str, Any]:
    stats = server.stats()
    header = server.header
    assert header is not None
    zero_pages = int.from_bytes(header.zero_bitmap, "little").bit_count()
    return {
        "migration_id": server.migration_id,
        "state": stats["state"],
        "guest_pages": header.total_pages,
        "eager_pages": sum(run.npages for run in header.eager),
        "zero_pages_in_header": zero_pages,
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


def serve(mem_bytes: int, vcpus: int, **options: Any) -> dict[str, Any]:
    """run_source on a uvloop event loop (the entry point for a process)."""
    return uvloop.run(run_source(mem_bytes, vcpus, **options))
