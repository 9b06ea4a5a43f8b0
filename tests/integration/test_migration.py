"""End to end: a running memtouch guest migrates post-copy from a source process to this one, in
both fault modes, with 1 and 2 vCPUs, reads and writes in flight; the guest verifies itself
before and after, and every page of the bitmap is present exactly once by one arrival kind."""
from __future__ import annotations

import asyncio

import pytest

from postcopy.demo import run_demo

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("kvm_available", "uffd_available")]
MEM = 64 << 20


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("mode", ["exit", "classic"])
def test_migration_keeps_every_page_and_the_guest_running(mode: str, vcpus: int) -> None:
    report = asyncio.run(run_demo(MEM, vcpus, mode, warmup_s=0.3, after_s=0.5))  # type: ignore[arg-type]
    assert report["verified"] is True, report
    assert report["guest_errors"] == 0 and report["failures"] == []
    assert report["fault_mode"] == mode and report["vcpus"] == vcpus
    pages = report["pages"]
    assert sum(pages.values()) == MEM // 4096  # the bitmap: each page present, counted once
    assert report["all_pages_present"] is True
    assert pages["eager"] >= 3 and pages["demand"] > 0 and pages["background"] > 0
    g = report["guest"]
    assert g["before"]["swept_pages"] == g["after"]["swept_pages"] > 0
    assert g["progress_after_complete"] > 0  # the guest kept working after the switchover
    # every fault in the report, the ones a private loop still held as the last page came too
    assert sum(report["exit_kinds"].values()) >= pages["demand"], report["exit_kinds"]
    if mode == "exit":
        assert report["exit_kinds"]["mmio"] > 0  # this host's data-access exit
    assert report["downtime_ms"] is not None and report["downtime_ms"] < 1000
