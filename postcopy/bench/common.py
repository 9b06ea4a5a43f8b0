"""What the fetch, stream and migrate sections share: their options, a source process to measure
against, and percentiles. (The runner's own BenchOptions is the one the integrator keeps.)"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from postcopy.destination.client import start_migration
from proto import MigrationHeader

SOURCE_START_TIMEOUT_S = 60.0
TOKEN_ENV = "POSTCOPY_TOKEN"


@dataclass(slots=True)
class BenchOptions:
    quick: bool = False
    vcpus: list[int] = field(default_factory=lambda: [1, 2])
    json: bool = False


@dataclass(slots=True)
class Source:
    """A `postcopy source` process serving a memtouch guest on loopback."""

    proc: subprocess.Popen[bytes]
    url: str
    token: str
    mem_bytes: int

    async def pause(self) -> MigrationHeader:
        """POST /v1/migration/start: the guest stops, its pages are served from now on."""
        async with aiohttp.ClientSession() as session:
            header, _ = await start_migration(session, self.url, self.token)
        return header


@contextmanager
def source_process(mem_bytes: int, vcpus: int, seed: int = 7, prefill: float = 0.0) -> Iterator[Source]:
    """A source in its own process (its own GIL and event loop, as on a real source host);
    ``prefill``: the fraction of its RAM written before its guest starts (bench/source.py)."""
    token = secrets.token_urlsafe(32)
    proc = subprocess.Popen(
        [sys.executable, "-m", "postcopy.bench.source", "--mem", str(mem_bytes), "--vcpus", str(vcpus),
         "--seed", str(seed), "--prefill", str(prefill)],
        stdout=subprocess.PIPE, env=dict(os.environ, **{TOKEN_ENV: token}))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the source exited with status {proc.wait()} before it was ready")
        yield Source(proc, json.loads(line)["url"], token, mem_bytes)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    opts = BenchOptions(quick=args.quick, vcpus=[int(v) for v in args.vcpus.split(",")], json=args.json)
    result = run(opts)
    if opts.json:
        print(json.dumps({name: result}, indent=2))
    else:
        print("\n".join(table(result)))
    return 0
