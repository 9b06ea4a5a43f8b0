"""What the fetch, stream and migrate sections share: a source VMM to measure against, driven
through its control API, and percentiles."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from postcopy.api.client import ApiClient, ApiClientError
from postcopy.bench import BenchError, BenchOptions
from postcopy.destination.client import fetch_zero_map, start_migration
from postcopy.logs import child_env
from proto import MigrationHeader
from vmm.libc import ends_with_parent

SOURCE_START_TIMEOUT_S = 60.0
SOURCE_STOP_TIMEOUT_S = 10.0


@dataclass(slots=True)
class Source:
    """A `vmm serve` process running a memtouch guest, its page server listening on loopback."""

    proc: subprocess.Popen[bytes]
    url: str
    token: str
    mem_bytes: int

    async def pause(self) -> tuple[MigrationHeader, bytes]:
        """POST /v1/migration/start: the guest stops, its pages are served from now on.
        Returns the header and the zero map."""
        async with aiohttp.ClientSession() as session:
            header, _ = await start_migration(session, self.url, self.token)
            zero_map, _ = await fetch_zero_map(session, self.url, self.token)
        header.check_zero_map(zero_map)
        return header, zero_map.zero_bitmap

    @contextlib.contextmanager
    def kept_off(self, cpus: set[int]) -> Iterator[None]:
        """For the block, every thread of the source and of its page workers on this process's
        CPUs but ``cpus`` (the threads and workers it starts meanwhile inherit it), then back on all of them; nothing changes
        where no CPU would be left. On a real pair of hosts the source has CPUs of its own; on
        this one it is kept off the CPUs a measurement gives to the guest."""
        allowed = os.sched_getaffinity(0)
        rest = allowed - cpus
        if not rest or rest == allowed:
            yield
            return
        _set_affinity(self.proc.pid, rest)
        try:
            yield
        finally:
            _set_affinity(self.proc.pid, allowed)


def _set_affinity(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` and of its descendants (its page workers) on ``cpus``;
    one that ends meanwhile is skipped."""
    for tid in tasks(pid):
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass


def tasks(pid: int) -> list[int]:
    """The threads of process ``pid`` and of its descendants, as /proc lists them now."""
    found: list[int] = []
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except FileNotFoundError:
            continue
        found += tids
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    pids += [int(c) for c in f.read().split()]
            except FileNotFoundError:
                pass
    return found


@contextlib.contextmanager
def source_process(mem_bytes: int, vcpus: int, seed: int = 7, prefill: float = 0.0, *,
                   page_workers: bool = True) -> Iterator[Source]:
    """A source VMM in its own process (its own GIL and event loop, as on a real source host),
    set up through its control API: PUT /v1/vm (``prefill``: the fraction of its RAM written
    before its guest starts), then PUT /v1/migration/outgoing on a free loopback port (with
    ``page_workers`` as given: its plain page sockets served by processes or threads)."""
    token = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="postcopy-bench-") as tmp:
        api = f"unix:{tmp}/source.sock"
        proc = subprocess.Popen([sys.executable, "-m", "vmm.cli", "serve", "--api", api, "--ready-json"],
                                stdout=subprocess.PIPE, env=dict(os.environ, **child_env()),
                                preexec_fn=ends_with_parent())
        try:
            assert proc.stdout is not None
            if not proc.stdout.readline():
                raise BenchError(f"the source VMM exited with status {proc.wait()} before it was ready")

            async def setup() -> str:
                async with ApiClient(api) as client:
                    await client.create_vm(mem_bytes, vcpus, "memtouch", seed, prefill=prefill or None)
                    return str((await client.outgoing("127.0.0.1:0", token,
                                                      page_workers=None if page_workers else False))["url"])
            try:
                url = asyncio.run(setup())
            except ApiClientError as e:
                raise BenchError(f"source VMM: {e}") from None
            yield Source(proc, url, token, mem_bytes)
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for step in (proc.terminate, proc.kill):
        if proc.poll() is None:
            step()
        try:
            proc.wait(SOURCE_STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {"count": 0}
    s = sorted(samples_ns)
    pick = lambda q: round(s[min(len(s) - 1, int(q * len(s)))] / 1e3, 1)  # noqa: E731
    return {"count": len(s), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": round(s[-1] / 1e3, 1)}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def section_main(name: str, run: Callable[[BenchOptions], Any], table: Callable[[Any], list[str]]) -> int:
    """`python -m postcopy.bench.<name> [--quick] [--json] [--vcpus 1,2]`."""
    parser = argparse.ArgumentParser(prog=f"python -m postcopy.bench.{name}")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--vcpus", default="1,2", help="comma-separated vCPU counts")
    args = parser.parse_args()
    opts = BenchOptions(sections=(name,), quick=args.quick, vcpus=tuple(int(v) for v in args.vcpus.split(",")))
    result = run(opts)
    if args.json:
        print(json.dumps({name: result}, indent=2))
    else:
        print("\n".join(table(result)))
    return 0
