"""`postcopy demo`: one machine, two processes. A source process runs memtouch and serves its
pages; this process is the destination: it migrates the running guest post-copy over loopback,
keeps it running, and has the guest itself verify every page before and after."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from typing import Any

import aiohttp

from postcopy.destination.client import FetchError
from postcopy.destination.migration import FaultMode, MigrationError
from postcopy.destination.run import migrate, source_json
from postcopy.logs import child_env

SOURCE_START_TIMEOUT_S = 30.0
TOKEN_ENV = "POSTCOPY_TOKEN"


class DemoError(Exception):
    pass


async def _start_source(mem_bytes: int, vcpus: int, seed: int, token: str) -> tuple[asyncio.subprocess.Process, str]:
    env = dict(os.environ, **child_env(), **{TOKEN_ENV: token})  # the source logs as we do
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "postcopy.cli", "source", "--mem", str(mem_bytes), "--vcpus", str(vcpus),
        "--seed", str(seed), "--listen", "127.0.0.1:0", "--ready-json",
        stdout=asyncio.subprocess.PIPE, env=env)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), SOURCE_START_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        raise DemoError(f"the source did not come up within {SOURCE_START_TIMEOUT_S:.0f} s") from None
    if not line:
        await proc.wait()
        raise DemoError(f"the source exited with status {proc.returncode} before it was ready")
    return proc, json.loads(line)["url"]


async def run_demo(mem_bytes: int = 256 << 20, vcpus: int = 2, fault_mode: FaultMode = "exit", *,
                   warmup_s: float = 1.0, after_s: float = 1.0, seed: int = 7,
                   readahead_base: int = 4, timeline: bool = False) -> dict[str, Any]:
    token = secrets.token_urlsafe(32)
    proc, url = await _start_source(mem_bytes, vcpus, seed, token)
    try:
        await asyncio.sleep(warmup_s)
        async with aiohttp.ClientSession() as session:
            before = await source_json(session, "POST", f"{url}/v1/vm/sweep", token)
        return await migrate(url, token, fault_mode, after_s=after_s, before=before, readahead_base=readahead_base,
                             timeline=timeline)
    except (MigrationError, FetchError) as e:
        raise DemoError(str(e)) from None
    finally:
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


def render(report: dict[str, Any]) -> str:
    pages = ", ".join(f"{k} {v}" for k, v in report["pages"].items())
    kinds = ", ".join(f"{k} {v}" for k, v in report["exit_kinds"].items() if v) or "none"
    lat = report.get("fault_latency_us") or {}
    g = report["guest"]
    lines = [
        f"post-copy migration of a {report['guest_mib']} MiB, {report['vcpus']}-vCPU memtouch guest",
        f"  fault mode      {report['fault_mode']}",
        f"  downtime        {report['downtime_ms']} ms (source pause -> first KVM_RUN here)",
        f"  total           {report['total_ms']} ms (source pause -> every page present)",
        f"  pages           {pages}",
        f"  fault exits     {kinds}",
        f"  fault latency   p50 {lat.get('p50', '-')} us, p99 {lat.get('p99', '-')} us over {lat.get('count', 0)} faults",
        f"  page-in rate    {report['pagein_rate']:.0f} pages/s",
        f"  blocktime       {_blocktime(report.get('blocktime_ms') or {})} (time each vCPU waited for pages)",
        f"  guest check     before: {_sweep(g['before'])}; after: {_sweep(g['after'])}",
        f"  verified        {report['verified']} (guest errors {report['guest_errors']})",
    ]
    return "\n".join(lines)


def _blocktime(per_vcpu: dict[Any, float]) -> str:
    return ", ".join(f"vCPU {v} {ms:.1f} ms" for v, ms in per_vcpu.items()) or "-"


def _sweep(sweep: dict[str, Any]) -> str:
    if sweep.get("swept_pages") is None:
        return "not checked"
    return f"{sweep['swept_pages']} pages swept, {sweep['errors']} errors"
