"""`postcopy demo`: one machine, two processes. A source process runs memtouch and serves its
pages; this process is the destination: it migrates the running guest post-copy over loopback,
keeps it running, and has the guest itself verify every page before and after."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from postcopy.chaos import ChaosSchedule, schedule_argv
from postcopy.destination.client import FetchError
from postcopy.destination.migration import FaultMode, MigrationError
from postcopy.destination.retry import RetryPolicy
from postcopy.destination.run import migrate, source_json

SOURCE_START_TIMEOUT_S = 30.0
TOKEN_ENV = "POSTCOPY_TOKEN"


class DemoError(Exception):
    pass


async def spawn_ready(what: str, argv: list[str], env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``python -m <argv>`` and wait for its ``{"event": "ready", "url": ...}`` line."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", *argv, stdout=asyncio.subprocess.PIPE, env=env)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), SOURCE_START_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        raise DemoError(f"the {what} did not come up within {SOURCE_START_TIMEOUT_S:.0f} s") from None
    if not line:
        await proc.wait()
        raise DemoError(f"the {what} exited with status {proc.returncode} before it was ready")
    return proc, json.loads(line)["url"]


async def _start_source(mem_bytes: int, vcpus: int, seed: int, token: str) -> tuple[asyncio.subprocess.Process, str]:
    env = dict(os.environ, **{TOKEN_ENV: token})
    return await spawn_ready("source", ["postcopy.cli", "source", "--mem", str(mem_bytes), "--vcpus", str(vcpus),
                                        "--seed", str(seed), "--listen", "127.0.0.1:0", "--ready-json"], env)


async def start_chaos(upstream_url: str, schedule: ChaosSchedule) -> tuple[asyncio.subprocess.Process, str]:
    """The fault-injection proxy (postcopy/chaos.py) in a process of its own, in front of the source."""
    upstream = urlsplit(upstream_url)
    return await spawn_ready("chaos proxy", ["postcopy.chaos", "--upstream", f"{upstream.hostname}:{upstream.port}",
                                             "--listen", "127.0.0.1:0", *schedule_argv(schedule)])


async def stop_chaos(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    """SIGTERM the proxy and read its report line."""
    assert proc.stdout is not None
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
    except asyncio.TimeoutError:
        proc.kill()
        line = b""
    await proc.wait()
    return json.loads(line) if line else {}


async def run_demo(mem_bytes: int = 256 << 20, vcpus: int = 2, fault_mode: FaultMode = "exit", *,
                   warmup_s: float = 1.0, after_s: float = 1.0, seed: int = 7,
                   readahead_base: int = 4, chaos: ChaosSchedule | None = None,
                   retry: RetryPolicy | None = None) -> dict[str, Any]:
    """The demo; with ``chaos`` the destination reaches the source only through the
    fault-injection proxy, and the report adds what it injected."""
    token = secrets.token_urlsafe(32)
    proc, url = await _start_source(mem_bytes, vcpus, seed, token)
    proxy: asyncio.subprocess.Process | None = None
    try:
        await asyncio.sleep(warmup_s)
        async with aiohttp.ClientSession() as session:
            before = await source_json(session, "POST", f"{url}/v1/vm/sweep", token)
        via = url
        if chaos is not None:
            proxy, via = await start_chaos(url, chaos)
        report = await migrate(via, token, fault_mode, after_s=after_s, before=before, readahead_base=readahead_base,
                               retry=retry)
        if proxy is not None:
            injected = await stop_chaos(proxy)
            report["faults_injected"] = injected.get("faults_injected", 0)
            report["chaos"] = {k: v for k, v in injected.items() if k != "event"}
        return report
    except (MigrationError, FetchError) as e:
        raise DemoError(str(e)) from None
    finally:
        if proxy is not None and proxy.returncode is None:
            proxy.kill()
            await proxy.wait()
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
        f"  guest check     before: {_sweep(g['before'])}; after: {_sweep(g['after'])}",
        f"  verified        {report['verified']} (guest errors {report['guest_errors']})",
    ]
    if "faults_injected" in report:
        injected = ", ".join(f"{k} {v}" for k, v in report["chaos"].get("injected", {}).items())
        retries = report.get("retries") or {}
        lines.append(f"  chaos           {report['faults_injected']} faults injected ({injected}); "
                     f"{retries.get('failures', 0)} failed fetches, {retries.get('reconnects', 0)} reconnects")
    return "\n".join(lines)


def _sweep(sweep: dict[str, Any]) -> str:
    if sweep.get("swept_pages") is None:
        return "not checked"
    return f"{sweep['swept_pages']} pages swept, {sweep['errors']} errors"
