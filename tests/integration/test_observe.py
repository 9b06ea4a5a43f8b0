"""Seeing a migration, end to end: a real post-copy migration (64 MiB, 2 vCPUs, fault mode exit)
with its timeline, run through two VMMs' control APIs; the destination VMM's GET /metrics and
the source's page-server /metrics scraped while it serves, both parsed and checked against the
report; the demo command (fault mode
classic) writing report.html and timeline.png, with JSON log lines."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from postcopy import cli
from postcopy.demo import vmm_pair

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("kvm_available", "uffd_available")]
MEM = 64 << 20
VCPUS = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def _scrape_source(url: str, token: str, into: list[str]) -> None:
    """Scrape the source's /metrics until it goes away (it exits once the migration completes)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/metrics") as resp:
            assert resp.status == 401  # behind the bearer token like everything else
        while True:
            try:
                async with http.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}) as resp:
                    if resp.status == 200:
                        into.append(await resp.text())
            except aiohttp.ClientError:
                return
            await asyncio.sleep(0.01)


async def _until_verifying(source: Any, timeout_s: float = 20.0) -> None:
    """memtouch fills its RAM first and only then verifies: wait for its first report."""
    for _ in range(int(timeout_s / 0.05)):
        if (await source.vm())["guest"]["verified"] > 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the guest verified no page within {timeout_s} s")


async def _migrate_and_scrape(mode: str) -> tuple[dict[str, Any], str, list[str]]:
    token = secrets.token_urlsafe(16)
    source_scrapes: list[str] = []
    async with vmm_pair() as (source, dest):
        await source.create_vm(MEM, VCPUS, "memtouch", 7)
        await _until_verifying(source)
        url = (await source.outgoing("127.0.0.1:0", token))["url"]
        scraper = asyncio.ensure_future(_scrape_source(url, token, source_scrapes))
        try:
            await dest.incoming(url, token, fault_mode=mode, after_s=0.3, timeline=True)
            while (status := await dest.migration())["state"] not in ("completed", "failed"):
                await asyncio.sleep(0.05)
            assert status["state"] == "completed", status
            dest_text = await dest.metrics()  # the destination VMM's control API
            await asyncio.sleep(0.1)
        finally:
            scraper.cancel()
    return status["report"], dest_text, source_scrapes


def test_timeline_and_metrics_agree_with_the_report() -> None:
    mode = "exit"  # classic: the demo test below
    report, dest_text, source_scrapes = asyncio.run(_migrate_and_scrape(mode))
    assert report["verified"] is True, report
    tl = report["timeline"]
    marks, faults, pages = tl["marks_ms"], tl["faults"], tl["pages"]
    assert tl["clock"] == "source_pause" and tl["fault_mode"] == mode and tl["vcpus"] == VCPUS
    assert 0 < marks["resume"] < marks["complete"]

    # Every fault once: the arrays match exit_kinds, kind by kind, and are in time order.
    n = sum(report["exit_kinds"].values())
    assert n > 0 and len(faults["t_us"]) == len(faults["vcpu"]) == len(faults["kind"]) == len(faults["latency_us"]) == n
    for name, count in report["exit_kinds"].items():
        assert faults["kind"].count(faults["kinds"].index(name)) == count
    assert faults["t_us"] == sorted(faults["t_us"]) and faults["t_us"][0] >= marks["resume"] * 1e3 - 1
    assert set(faults["vcpu"]) <= set(range(VCPUS))

    # Pages over time only grow, and end at the tracker's counts (which cover the guest).
    for kind, count in report["pages"].items():
        assert pages[kind] == sorted(pages[kind]) and pages[kind][-1] == count
    assert sum(pages[k][-1] for k in report["pages"]) == tl["npages"] == MEM // 4096
    assert pages["t_ms"][-1] >= marks["complete"]

    # Blocktime: per vCPU the sum of its faults' latencies, never more than the migration took.
    for vcpu, ms in enumerate(tl["blocktime_ms"]):
        mine = [lat for lat, v in zip(faults["latency_us"], faults["vcpu"]) if v == vcpu]
        assert ms == pytest.approx(sum(mine) / 1e3, abs=0.01 * len(mine) + 0.01)
        assert ms == pytest.approx(report["blocktime_ms"][str(vcpu)] if str(vcpu) in report["blocktime_ms"]
                                   else report["blocktime_ms"][vcpu], abs=0.01)
        assert ms <= report["total_ms"]
    assert 0 <= tl["blocktime_all_ms"] <= min(tl["blocktime_ms"])

    # Guest progress: the source's series ends at its pause; here the guest kept verifying.
    src, dst = tl["progress"]["source"], tl["progress"]["destination"]
    assert src["t_ms"][-1] == 0 and all(t <= 0 for t in src["t_ms"]) and src["verified"] == sorted(src["verified"])
    assert dst["verified"] == sorted(dst["verified"]) and dst["t_ms"][0] > 0  # from the vCPUs' start
    assert dst["verified"][0] >= src["verified"][-1]  # the count travelled with the guest

    # The destination's /metrics, as scraped over HTTP, says what the report says.
    s = parse(dest_text)
    for kind, count in report["exit_kinds"].items():
        assert value(s, "postcopy_faults_total", mode=mode, kind=kind) == count
    for arrival, count in report["pages"].items():
        assert value(s, "postcopy_pages_total", arrival=arrival) == count
    assert value(s, "postcopy_fault_latency_seconds_count", mode=mode) == n
    assert value(s, "postcopy_fault_latency_seconds_sum", mode=mode) == pytest.approx(
        sum(faults["latency_us"]) / 1e6, rel=1e-3, abs=1e-4)
    assert value(s, "postcopy_pages_missing") == 0 and value(s, "postcopy_fetch_errors_total") == 0
    assert value(s, "postcopy_migration_state", side="destination", state="complete") == 1
    assert value(s, "postcopy_migration_state", side="destination", state="running") == 0
    assert value(s, "postcopy_received_bytes_total") > 0
    assert value(s, "postcopy_downtime_seconds") * 1e3 == pytest.approx(report["downtime_ms"], abs=0.01)
    for vcpu, ms in enumerate(tl["blocktime_ms"]):
        assert value(s, "postcopy_blocktime_seconds_total", vcpu=str(vcpu)) * 1e3 == pytest.approx(ms, abs=0.01)

    # The source's /metrics while it served: parsed, and its counters only grew.
    scraped = [parse(text) for text in source_scrapes]
    served = [value(x, "postcopy_source_pages_served_total", how="data") for x in scraped]
    assert served == sorted(served)
    paused = [x for x in scraped if value(x, "postcopy_migration_state", side="source", state="running") == 0]
    assert paused, "no scrape while the source served its pages"
    # the destination's sockets, open while it pulls pages: page workers (memfd RAM), no threads
    assert max(value(x, "postcopy_source_page_sockets", served_by="worker") for x in paused) >= 1
    assert {value(x, "postcopy_source_page_sockets", served_by="thread") for x in paused} == {0}
    for x in paused:
        assert value(x, "postcopy_source_header_bytes") == report["header_bytes"]
        assert value(x, "postcopy_guest_pages_verified") == src["verified"][-1]  # frozen at the pause


def test_demo_writes_the_report_and_logs_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "postcopy.cli", "-v", "--log-format", "json", "demo", "--mem", "64M",
           "--fault-mode", "classic", "--warmup", "0.3", "--after", "0.3", "--report", str(out), "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTCOPY_")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verified"] is True and report["timeline"]["version"] == 1
    # Classic mode: feat.ptid named the vCPU of every fault, so blocktime is per vCPU.
    faults = report["timeline"]["faults"]
    assert len(faults["vcpu"]) == report["exit_kinds"]["uffd"] > 0 and set(faults["vcpu"]) <= set(range(VCPUS))
    assert sum(report["timeline"]["blocktime_ms"]) == pytest.approx(sum(faults["latency_us"]) / 1e3, rel=1e-3, abs=0.1)

    png = (out / "timeline.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # IHDR
    assert width >= 800 and height >= 600
    page = (out / "report.html").read_text()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page  # self-contained
    assert "Blocktime" in page and "Fault latency" in page and "verified" in page
    assert json.loads((out / "report.json").read_text()) == report

    # One JSON object per stderr line, from both processes; the state machines' transitions.
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert all({"ts", "level", "logger", "event"} <= e.keys() for e in events)
    states = [(e["side"], e["from"], e["to"]) for e in events if e["event"] == "state"]
    assert states.count(("destination", "running", "complete")) == 1
    assert ("source", "running", "serving") in states and ("source", "serving", "completed") in states
    mid = {e["migration_id"] for e in events if e["event"] == "state" and e["migration_id"]}
    assert len(mid) == 1 and mid.pop().startswith("mig-")

    # `postcopy report` reads a saved report (rendering itself: tests/postcopy/test_report.py);
    # one without a timeline is refused clearly.
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({k: v for k, v in report.items() if k != "timeline"}))
    assert cli.main(["report", str(bare), "--out", str(tmp_path / "x")]) == 1
    assert "no timeline" in capsys.readouterr().err
