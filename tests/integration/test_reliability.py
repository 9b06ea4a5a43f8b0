"""End to end under faults: a running memtouch guest migrates through the fault-injection proxy
in both fault modes, and across a page server that is SIGKILLed and restarted mid-migration;
the guest verifies itself before and after."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest

from postcopy.chaos import ChaosSchedule
from postcopy.demo import run_demo
from postcopy.destination import private_loop
from postcopy.destination.classic_mode import handler_cpus
from postcopy.destination.retry import RetryPolicy
from postcopy.destination.run import migrate
from postcopy.source import state_dir as states

if TYPE_CHECKING:
    from tests.conftest import TlsFiles

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("kvm_available", "uffd_available")]
MEM = 64 << 20
PAGES = MEM // 4096


def assert_verified(report: dict) -> None:
    assert report["verified"] is True, report
    assert report["guest_errors"] == 0 and report["failures"] == []
    assert sum(report["pages"].values()) == PAGES and report["all_pages_present"] is True


@pytest.mark.parametrize(("mode", "readahead"), [("exit", (4, None)), ("exit", (1, 1)), ("exit", (1, None)),
                                                 ("classic", (4, None)), ("classic", (1, 1)), ("classic", (1, None))])
def test_chaos_proxy_faults_of_every_kind_are_survived_and_the_guest_verifies(
        mode: str, readahead: tuple[int, int | None]) -> None:
    # Every connection gets one fault within its first 1.5 MiB of answers: the background
    # stream (64 MiB) is hit again and again, each vCPU's socket too. The vCPUs' loops (exit)
    # or the handlers' (classic) run in private interpreters (where they can), which hand a
    # broken or bad answer back to their thread's retrying connection, with first windows of
    # four pages (the default) or one.
    schedule = ChaosSchedule(seed=5, every=1, after_bytes=(4096, 4 << 20), stall_s=(0.02, 0.2))
    base, most = readahead
    report = asyncio.run(run_demo(MEM, 2, mode, warmup_s=0.3, after_s=0.3, chaos=schedule,  # type: ignore[arg-type]
                                  retry=RetryPolicy(deadline_s=20, seed=1), readahead_base=base, readahead_max=most))
    assert_verified(report)
    loops = 2 if mode == "exit" else len(handler_cpus(2))  # a vCPU's, or a handler's per CPU
    assert report["private_fault_loops"] == (loops if private_loop.unavailable() is None else 0)
    injected = report["chaos"]["injected"]
    assert report["faults_injected"] >= 4 and all(n > 0 for n in injected.values()), report["chaos"]
    retries = report["retries"]
    assert retries["reconnects"] > 0 and retries["exhausted"] == 0
    # A corrupted page never gets in: its checksum fails and it is fetched again.
    assert injected["corrupt"] == 0 or sum(retries["reasons"].values()) >= injected["corrupt"]


def test_every_connection_dropped_at_set_times_is_survived() -> None:
    drops = (0.05, 0.15, 0.3, 0.5)
    schedule = ChaosSchedule(seed=1, every=1, after_bytes=(1 << 40, 1 << 40), at_s=drops)  # only the timed drops
    report = asyncio.run(run_demo(MEM, 2, "exit", warmup_s=0.3, after_s=0.3, chaos=schedule,
                                  retry=RetryPolicy(deadline_s=20)))
    assert_verified(report)
    assert report["chaos"]["dropped_at_times"] >= len(drops), report["chaos"]
    assert report["retries"]["reconnects"] >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _source(argv: list[str], token: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([sys.executable, "-m", "postcopy.cli", "source", *argv, "--ready-json"],
                            stdout=subprocess.PIPE, env=dict(os.environ, POSTCOPY_TOKEN=token))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"source exited with {proc.wait()}"
    return proc, json.loads(line)["url"]


async def _wait_serving(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(2000):
            async with session.get(f"{url}/v1/health") as resp:
                if (await resp.json())["state"] == "serving":
                    return
            await asyncio.sleep(0.005)
    raise AssertionError("the source never reached the switchover")


@pytest.mark.parametrize("mode", ["exit", "classic"])
def test_page_server_sigkilled_mid_migration_is_restarted_with_one_command_and_the_guest_verifies(mode: str) -> None:
    state = Path(f"/dev/shm/postcopy-test-{secrets.token_hex(4)}")
    port, token = _free_port(), secrets.token_urlsafe(16)
    listen = f"127.0.0.1:{port}"
    first, url = _source(["--mem", str(MEM), "--vcpus", "2", "--listen", listen, "--state-dir", str(state)], token)
    second: subprocess.Popen[bytes] | None = None
    try:
        async def scenario() -> tuple[dict, float]:
            # A slow background (one page at a time: ~16 k round trips) and one page per fault
            # (no readahead) keep pages missing for a while. With 4-page batches the transfer
            # could end within the 0.1 s below once the vCPUs left it the CPU (vcpu_priority.py).
            migration = asyncio.ensure_future(migrate(
                url, token, mode, after_s=0.3, retry=RetryPolicy(deadline_s=30),  # type: ignore[arg-type]
                background_batch_pages=1, background_depth=1, readahead_base=1, readahead_max=1))
            await _wait_serving(url)
            await asyncio.sleep(0.1)
            assert (state / states.HEADER).exists() and (state / states.RAM).stat().st_size == MEM
            assert (state / states.RESUME).stat().st_mode & 0o777 == 0o600
            first.send_signal(signal.SIGKILL)
            first.wait()
            killed = time.monotonic()
            assert not migration.done()
            nonlocal second
            second, again = await asyncio.to_thread(_source, ["--resume", str(state), "--listen", listen], token)
            assert again == url
            return await migration, time.monotonic() - killed
        report, outage_s = asyncio.run(scenario())
        assert_verified(report)
        assert report["retries"]["reconnects"] >= 1 and report["retries"]["failures"] >= 1
        assert second is not None and second.stdout is not None
        summary = json.loads(second.stdout.readline())
        assert second.wait(10) == 0
        # The restarted server served what was still missing, and got the Complete.
        assert summary["event"] == "summary" and summary["state"] == "completed"
        assert summary["pages_data"] > 0, summary
        assert not state.exists()  # its RAM file is released after Complete
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(state, ignore_errors=True)


def test_migration_over_tls_with_a_throwaway_ca_verifies(tls_files: TlsFiles) -> None:
    from postcopy.tls import client_context
    token = secrets.token_urlsafe(16)
    source, url = _source(["--mem", str(MEM), "--vcpus", "2", "--listen", "127.0.0.1:0",
                           "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key)], token)
    try:
        assert url.startswith("https://127.0.0.1:")
        report = asyncio.run(migrate(url, token, "exit", after_s=0.3,
                                     ssl_context=client_context(str(tls_files.ca))))
        assert_verified(report)
        assert source.wait(10) == 0
    finally:
        if source.poll() is None:
            source.kill()
            source.wait()


def test_a_source_that_never_comes_back_fails_the_migration_after_the_deadline_with_the_guest_paused() -> None:
    from postcopy.destination.migration import Destination, DestinationState, MigrationError
    from vmm.vcpu import VcpuState
    token = secrets.token_urlsafe(16)
    source, url = _source(["--mem", str(MEM), "--vcpus", "2", "--listen", "127.0.0.1:0"], token)

    async def scenario() -> None:
        dest = Destination(url, token, fault_mode="exit", retry=RetryPolicy(deadline_s=1.0),
                           background_batch_pages=4, background_depth=1)
        try:
            await dest.prepare(MEM, 2)
            await dest.switchover()
            source.kill()
            source.wait()
            t0 = time.monotonic()
            with pytest.raises(MigrationError, match=r"gave up after .*\(retry deadline 1.0 s\)"):
                await dest.wait_complete(timeout=30)
            assert time.monotonic() - t0 < 5
            assert dest.state is DestinationState.FAILED and "gave up" in (dest.error or "")
            assert dest.machine is not None and dest.tracker is not None and dest.tracker.missing() > 0
            assert all(t.state is not VcpuState.RUNNING for t in dest.machine.vcpus)  # never runs on missing memory
        finally:
            await dest.close()
    try:
        asyncio.run(scenario())
    finally:
        if source.poll() is None:
            source.kill()
            source.wait()
