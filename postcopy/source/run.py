"""The source side of a migration, end to end: boot a memtouch guest, serve it, release it.

``run_source`` is what the command line and the tests call; ``serve`` runs it on uvloop.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import Callable
from typing import Any

import uvloop

from postcopy.source import state_dir as states
from postcopy.source.page_server import MigrationState, PageServer
from proto import MigrationHeader
from vmm.guest import workloads
from vmm.machine import Machine, MachineConfig
from vmm.memory import GuestMemory

__all__ = ["SourceError", "boot_memtouch", "resume_source", "run_source", "serve"]

log = logging.getLogger("postcopy.source.run")
WORKLOAD = "memtouch"
# After Complete the server stays up this long, so that a destination whose first Complete lost
# its answer on the way back (it retries) gets its 204 instead of a refused connection.
COMPLETE_GRACE_S = 0.2


class SourceError(Exception):
    """The source could not hand its guest over; the message says at which step."""


def boot_memtouch(mem_bytes: int, vcpus: int, seed: int, *,
                  ram_path: str | None = None) -> tuple[Machine, dict[str, int | str]]:
    """A started memtouch guest on memfd-backed RAM (or on the file ``ram_path``, which
    outlives this process), and the workload record for its header."""
    program, params = workloads.plan(WORKLOAD, mem_bytes, vcpus, seed)
    memory = GuestMemory.create(mem_bytes, "file", path=ram_path) if ram_path else None
    machine = Machine.create(MachineConfig(mem_bytes, vcpus, backing="memfd"), memory=memory)
    try:
        machine.boot(program, params)
        machine.start()
    except BaseException:
        machine.close()
        raise
    workload: dict[str, int | str] = {"name": WORKLOAD, "seed": seed, "mem_bytes": mem_bytes, "vcpus": vcpus}
    return machine, workload


async def run_source(mem_bytes: int, vcpus: int, *, host: str, port: int, token: str, seed: int,
                     warmup_s: float, on_ready: Callable[[str], None] | None = None,
                     timeout_s: float | None = None, state_dir: str | None = None,
                     ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """Boot the guest, let it run `warmup_s`, announce the page server's URL with `on_ready`,
    then serve until the destination sends Complete (or `timeout_s` passes: SourceError).
    With ``state_dir`` guest RAM lives in a file there and the header is saved there at the
    switchover, so that ``resume_source`` can take over if this process dies.

    The guest is released (its RAM unmapped) only after the server has closed every socket.
    """
    ram_path = states.prepare(state_dir) if state_dir else None
    machine, workload = boot_memtouch(mem_bytes, vcpus, seed, ram_path=ram_path)
    migration_id = f"mig-{secrets.token_hex(8)}"

    def save(header: MigrationHeader, header_bytes: bytes) -> None:
        assert state_dir is not None
        states.save(state_dir, header_bytes, states.ResumeRecord(migration_id, token))

    try:
        server = PageServer(machine, token=token, migration_id=migration_id, workload=workload,
                            on_export=save if state_dir else None)
        summary = await _serve_until_complete(server, host, port, ssl_context, warmup_s, on_ready, timeout_s)
    finally:
        machine.close()
    if state_dir:
        states.remove(state_dir)
    return summary


async def resume_source(state_dir: str, *, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                        on_ready: Callable[[str], None] | None = None,
                        timeout_s: float | None = None) -> dict[str, Any]:
    """Serve a migration again from its state directory, after its page server died: no guest
    runs here, pages come straight from the RAM file."""
    header, header_bytes, record, memory = states.load(state_dir)
    try:
        server = PageServer.resumed(memory, header, header_bytes, token=record.token)
        summary = await _serve_until_complete(server, host, port, ssl_context, 0.0, on_ready, timeout_s)
    finally:
        memory.close()
    states.remove(state_dir)
    return summary


async def _serve_until_complete(server: PageServer, host: str, port: int, ssl_context: ssl.SSLContext | None,
                                warmup_s: float, on_ready: Callable[[str], None] | None,
                                timeout_s: float | None) -> dict[str, Any]:
    migration_id = server.migration_id
    async with server:
        url = await server.start(host, port, ssl_context=ssl_context)
        log.info("page server for %s at %s (%s); guest warming up %.1f s", migration_id, url,
                 server.state.value, warmup_s)
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
        await asyncio.sleep(COMPLETE_GRACE_S)
        return _summary(server)


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
