"""`postcopy demo`: one machine, two VMM processes (`vmm serve` on unix sockets in a temporary
folder), one migration between them through their control APIs (postcopy.orchestrate), and
both shut down afterwards, also on error or Ctrl-C. The guest verifies itself before and after.
With ``chaos`` the destination reaches the source's page server only through the
fault-injection proxy (postcopy/chaos.py, a process of its own), and the report adds what it
injected."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from postcopy.api.client import ApiClient, ApiClientError
from postcopy.chaos import ChaosSchedule, schedule_argv
from postcopy.destination.readahead import DEFAULT_BASE
from postcopy.destination.retry import RetryPolicy
from postcopy.logs import child_env
from postcopy.orchestrate import MigrateOptions, OrchestrationError, run_migration
from postcopy.progress import ProgressLine
from vmm.libc import ends_with_parent

VMM_START_TIMEOUT_S: Final = 30.0
CHAOS_STOP_TIMEOUT_S: Final = 10.0
VMM_STOP_TIMEOUT_S: Final = 15.0


class DemoError(Exception):
    pass


async def spawn_ready(what: str, argv: list[str], key: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``python -m <argv>`` (logging as we do) and wait for its one-line JSON ready event;
    returns the process and the event's ``key``."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", *argv, stdout=asyncio.subprocess.PIPE,
                                                env=dict(os.environ, **child_env()),
                                                preexec_fn=ends_with_parent())
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), VMM_START_TIMEOUT_S)
        if not line:
            await proc.wait()
            raise DemoError(f"the {what} exited with status {proc.returncode} before it was ready")
        return proc, json.loads(line)[key]
    except TimeoutError:
        await asyncio.shield(stop_vmm(proc, None))
        raise DemoError(f"the {what} did not come up within {VMM_START_TIMEOUT_S:.0f} s") from None
    except BaseException:  # Ctrl-C while it starts, or a ready line we cannot read: no orphan
        await asyncio.shield(stop_vmm(proc, None))
        raise


async def start_vmm(socket_path: Path, name: str) -> tuple[asyncio.subprocess.Process, str]:
    """A `vmm serve` child on ``socket_path``; returns it and its API address once ready."""
    return await spawn_ready(f"{name} VMM", ["vmm.cli", "serve", "--api", f"unix:{socket_path}", "--ready-json"],
                             "api")


async def start_chaos(upstream_url: str, schedule: ChaosSchedule) -> tuple[asyncio.subprocess.Process, str]:
    """The fault-injection proxy in a process of its own, in front of the page server."""
    upstream = urlsplit(upstream_url)
    return await spawn_ready("chaos proxy", ["postcopy.chaos", "--upstream", f"{upstream.hostname}:{upstream.port}",
                                             "--listen", "127.0.0.1:0", *schedule_argv(schedule)], "url")


async def stop_chaos(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    """SIGTERM the proxy and read its report line (what it injected)."""
    assert proc.stdout is not None
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), CHAOS_STOP_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        line = b""
    await proc.wait()
    return json.loads(line) if line else {}


async def stop_vmm(proc: asyncio.subprocess.Process, api: ApiClient | None) -> None:
    """POST /v1/shutdown, then wait; SIGTERM, then SIGKILL, if it does not go."""
    if proc.returncode is None and api is not None:
        with contextlib.suppress(ApiClientError):
            await api.shutdown()
    for step in (None, proc.terminate, proc.kill):
        if step is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                step()
        try:
            await asyncio.wait_for(proc.wait(), VMM_STOP_TIMEOUT_S)
            return
        except TimeoutError:
            continue


@contextlib.asynccontextmanager
async def vmm_pair() -> AsyncIterator[tuple[ApiClient, ApiClient]]:
    """Two local VMMs (source, destination) and a client for each; both stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="postcopy-demo-") as tmp:
        procs: list[tuple[asyncio.subprocess.Process, ApiClient]] = []
        try:
            # Both start at once: a VMM's start (its imports) is most of a small demo's time.
            started = await asyncio.gather(*(start_vmm(Path(tmp) / f"{name}.sock", name)
                                             for name in ("source", "destination")), return_exceptions=True)
            for result in started:
                if not isinstance(result, BaseException):
                    procs.append((result[0], ApiClient(result[1])))
            for result in started:
                if isinstance(result, BaseException):
                    raise result
            yield procs[0][1], procs[1][1]
        finally:
            # Shielded: a Ctrl-C (cancellation) must not leave a VMM running.
            await asyncio.shield(_stop_all(procs))


async def _stop_all(procs: list[tuple[asyncio.subprocess.Process, ApiClient]]) -> None:
    await asyncio.gather(*(stop_vmm(proc, api) for proc, api in procs))
    for _, api in procs:
        await api.close()


async def run_demo(mem_bytes: int = 256 << 20, vcpus: int = 2, fault_mode: str = "exit", *,
                   warmup_s: float = 1.0, after_s: float = 1.0, seed: int = 7, readahead_base: int = DEFAULT_BASE,
                   progress: ProgressLine | None = None, timeline: bool = False,
                   chaos: ChaosSchedule | None = None, retry: RetryPolicy | None = None,
                   vcpu_nice: int | None = None, readahead_max: int | None = None) -> dict[str, Any]:
    opts = MigrateOptions(token=secrets.token_urlsafe(32), page_listen="127.0.0.1:0", fault_mode=fault_mode,
                          create=True, mem=mem_bytes, vcpus=vcpus, seed=seed, warmup_s=warmup_s,
                          after_s=after_s, readahead=readahead_base, readahead_max=readahead_max, timeline=timeline,
                          retry_deadline_s=retry.deadline_s if retry is not None else None, vcpu_nice=vcpu_nice)
    proxy: asyncio.subprocess.Process | None = None

    async def through_chaos(url: str) -> str:
        nonlocal proxy
        assert chaos is not None
        proxy, via = await start_chaos(url, chaos)
        return via

    try:
        async with vmm_pair() as (source, dest):
            report = await run_migration(source, dest, opts, progress, through_chaos if chaos is not None else None)
        if proxy is not None:
            injected = await stop_chaos(proxy)
            report["faults_injected"] = injected.get("faults_injected", 0)
            report["chaos"] = {k: v for k, v in injected.items() if k != "event"}
        return report
    except OrchestrationError as e:
        raise DemoError(str(e)) from None
    finally:
        if proxy is not None and proxy.returncode is None:
            proxy.kill()
            await proxy.wait()


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
        f"  vCPU priority   {_vcpu_nice(report.get('vcpu_nice', 0))}",
        f"  guest check     before: {_sweep(g['before'])}; after: {_sweep(g['after'])}",
        f"  verified        {report['verified']} (guest errors {report['guest_errors']})",
    ]
    if "faults_injected" in report:
        injected = ", ".join(f"{k} {v}" for k, v in report["chaos"].get("injected", {}).items())
        retries = report.get("retries") or {}
        lines.append(f"  chaos           {report['faults_injected']} faults injected ({injected}); "
                     f"{retries.get('failures', 0)} failed fetches, {retries.get('reconnects', 0)} reconnects")
    return "\n".join(lines)


def _vcpu_nice(nice: int) -> str:
    return f"nice {nice} until every page was present" if nice else "unchanged during post-copy"


def _blocktime(per_vcpu: dict[Any, float]) -> str:
    return ", ".join(f"vCPU {v} {ms:.1f} ms" for v, ms in per_vcpu.items()) or "-"


def _sweep(sweep: dict[str, Any]) -> str:
    if sweep.get("swept_pages") is None:
        return "not checked"
    return f"{sweep['swept_pages']} pages swept, {sweep['errors']} errors"
