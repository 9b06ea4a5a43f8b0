"""Smoke test of the fetch, stream and migrate bench sections on small guests: the measuring
code runs the real paths and its figures add up (not how fast they are: that is the bench's)."""
from __future__ import annotations

import asyncio
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from postcopy.bench import fetch, migrate, socket_baseline, stream
from postcopy.bench.common import percentiles_us, source_process, tasks
from postcopy.bench.fault_vm import scan
from postcopy.bench.socket_baseline import StreamYardstick, pingpong_ns
from postcopy.destination.client import SyncPageConnection
from vmm.guest.layout import DATA_GPA, PAGE_SIZE

from procs import running  # type: ignore[import-not-found]

pytestmark = pytest.mark.usefixtures("kvm_available", "uffd_available")
MiB = 1 << 20
GUEST = 16 * MiB


def test_fault_scans_and_the_stream_fetch_every_page_of_a_paused_source() -> None:
    with source_process(GUEST, 2, prefill=1.0) as source:
        header, zero_bitmap = asyncio.run(source.pause())
        data_pages = (GUEST - DATA_GPA) // PAGE_SIZE
        single = scan(header, zero_bitmap, source.url, source.token, 2, readahead_base=1, readahead_max=1)
        assert single.pages == data_pages and len(single.latency_ns) == data_pages
        assert single.fetches > data_pages * 0.95  # one page a fault (zero-map pages are made here)
        ahead = scan(header, zero_bitmap, source.url, source.token, 1, readahead_base=4, readahead_max=256)
        assert ahead.pages == data_pages and ahead.fetches < data_pages // 16
        streamed = stream.measure(header, zero_bitmap, source.url, source.token)
        assert streamed["data_pages"] + streamed["zero_pages"] == GUEST // PAGE_SIZE
        assert streamed["data_pages"] > data_pages * 0.9 and streamed["mib_s"] > 0


def test_one_page_scans_pool_their_faults_per_vcpu_count() -> None:
    with source_process(GUEST, 2, prefill=1.0) as source:
        header, zero_bitmap = asyncio.run(source.pause())
        single = fetch.one_page_scans(source, header, zero_bitmap, 2, (1, 2))
    data_pages = (GUEST - DATA_GPA) // PAGE_SIZE
    for vcpus in ("1", "2"):
        d = single[vcpus]
        assert d["scans"] == 2 and d["pages"] == 2 * data_pages and d["count"] == 2 * data_pages
        assert 0 < d["p50"] <= d["p99"] <= d["max"] and d["pages_s"] > 0
    assert "no_poll" in single["1"] and "no_poll" not in single["2"]  # only a single vCPU polls
    assert single["1"]["no_poll"]["count"] == data_pages


def test_a_source_kept_off_cpus_runs_on_the_others_then_gets_them_back() -> None:
    allowed = os.sched_getaffinity(0)
    with source_process(GUEST, 1) as source:
        def affinities() -> set[frozenset[int]]:
            return {frozenset(os.sched_getaffinity(t)) for t in tasks(source.proc.pid)}

        def threads() -> int:
            return len(tasks(source.proc.pid))

        with source.kept_off(set(allowed)):  # no CPU would be left: nothing changes
            assert affinities() == {frozenset(allowed)}
        if len(allowed) < 2:
            pytest.skip("one CPU here: a source cannot be kept off it")
        cpu = min(allowed)
        earlier = SyncPageConnection(source.url, source.token)  # a page worker before the block
        with source.kept_off({cpu}):
            assert affinities() == {frozenset(allowed - {cpu})}
            before = threads()
            conn = SyncPageConnection(source.url, source.token)  # the source starts a page worker
            try:
                deadline = time.monotonic() + 10
                while threads() == before and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert threads() > before and affinities() == {frozenset(allowed - {cpu})}  # inherited
            finally:
                conn.close()
        assert affinities() == {frozenset(allowed)}
        earlier.close()


def test_the_yardsticks_measure_round_trips_and_a_rate() -> None:
    p = percentiles_us(pingpong_ns(200))
    assert p["count"] == 200 and 0 < p["p50"] <= p["p99"]


def test_the_stream_yardstick_moves_the_peers_memory_into_its_own() -> None:
    pages = 6 * MiB // PAGE_SIZE
    with StreamYardstick(8 * MiB) as yardstick:
        assert yardstick.rate(pages * PAGE_SIZE) > 0
        marks = memoryview(yardstick.received).cast("Q")[::PAGE_SIZE // 8].tolist()
        assert marks[:pages] == list(range(1, pages + 1))  # each of the peer's pages, in order, once
        assert set(marks[pages:]) == {0}  # touched before the clock, not received
        assert yardstick.rate(3 * MiB, cached=True) > 0  # the reference: one cached MiB again
        assert yardstick.rate(2 * MiB) > 0  # the same connection serves every round
        with pytest.raises(ValueError, match="holds"):
            yardstick.rate(9 * MiB)


def test_the_polling_ping_pong_waits_as_a_polling_vcpu_and_gives_its_cpus_back(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = os.sched_getaffinity(0)
    tries: list[int] = []
    yield_ = os.sched_yield
    monkeypatch.setattr(os, "sched_yield", lambda: tries.append(1) or yield_())
    seen: list[set[int]] = []
    recv = socket_baseline._recv_exact
    monkeypatch.setattr(socket_baseline, "_recv_exact",
                        lambda sock, view, poll_ns=0: seen.append(os.sched_getaffinity(0)) or recv(sock, view, poll_ns))
    p = percentiles_us(pingpong_ns(200, poll_ns=200_000, cpu=min(cpus)))
    assert p["count"] == 200 and 0 < p["p50"] <= p["p99"]
    pinned: list[tuple[int, set[int]]] = []
    setaffinity = os.sched_setaffinity
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, s: pinned.append((pid, set(s))) or setaffinity(pid, s))
    both = percentiles_us(pingpong_ns(200, poll_ns=200_000, peer_poll_ns=100_000, cpu=min(cpus), peer_cpu=max(cpus)))
    assert both["count"] == 200 and 0 < both["p50"] <= both["p99"]  # the peer polls too
    assert [s for pid, s in pinned if pid != 0] == [{max(cpus)}]  # the peer, on its CPU
    assert tries  # it polled (an answer is never there at once)
    assert seen and all(s == {min(cpus)} for s in seen)  # the rounds ran on that CPU
    assert os.sched_getaffinity(0) == cpus


def test_one_migration_row_and_the_tables_render() -> None:
    row = migrate.migrate_once(64, 0.0)
    assert row["guest_mib"] == 64 and 0 <= row["written_mib"] <= 64
    assert row["downtime_ms"] is not None and row["total_ms"] > 0 and row["rss_mib"] > 0
    assert sum(row["pages"].values()) == 64 * MiB // PAGE_SIZE
    assert migrate.table([row])[2].split()[0] == "64"
    assert migrate.table([row])[2].split()[4] == "-"  # no stream section in this run
    migrate.add_stream_bound([row], 1024.0)  # 64 MiB at 1 GiB/s: 62.5 ms
    assert row["stream_bound_ms"] == 62.5 and row["ratio_to_stream"] == pytest.approx(row["total_ms"] / 62.5)
    assert migrate.table([row])[2].split()[4] == f"{row['ratio_to_stream']:.2f}"
    fake = {"guest_mib": 16, "p50_us": 50.0, "p99_us": 90.0, "ratio_p50_to_socket": 1.2,
            "vcpus": {"1": {"p50": 50.0, "p99": 90.0, "pages_s": 10}},
            "socket": {"p50": 40.0, "p99": 60.0}, "readahead_pages_s": 5,
            "readahead": {"1": {"pages_s": 5, "fetches": 3}}, "stream_pages_s": 10,
            "readahead_ratio_to_stream": 0.5}
    assert any("ping-pong" in line for line in fetch.table(fake))
    assert not any("like for like" in line for line in fetch.table(fake))
    polled = {**fake, "socket_polled": {"p50": 20.0, "p99": 30.0},
              "vcpus": {"1": {**fake["vcpus"]["1"], "ratio_p50_to_polled_socket": 2.5,
                              "no_poll": {"p50": 60.0, "p99": 99.0, "pages_s": 8, "ratio_p50_to_socket": 1.5}}}}
    lines = fetch.table(polled)
    assert any("the same, polling" in line and "20.0" in line for line in lines)
    assert any("like for like, 1 vCPU" in line and "2.50" in line and "1.50" in line for line in lines)
    assert "16 MiB, page server" in fetch.table(fake)[0]
    assert "64 MiB (one page a fault), 16 MiB (readahead)" in fetch.table({**fake, "fault_guest_mib": 64})[0]
    row = {"guest_mib": 16, "data_pages": 1, "zero_pages": 0, "mib_s": 1.0, "pages_s": 1,
           "seconds": 1.0, "socket_mib_s": 2.0, "ratio_to_socket": 0.5, "repeat": 3}
    assert stream.table(row)[-1].split()[-1] == "0.500"
    lines = stream.table({**row, "socket_cached_mib_s": 2.5, "ratio_to_cached_socket": 0.4})
    assert lines[-1].split()[-1] == "0.500" and "from cache" in lines[-2] and "0.400" in lines[-2]


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` and that run the VMM (`vmm.cli serve`)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(stat[:-4] + "cmdline", "rb") as f:
                cmdline = f.read()
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == pid and b"vmm.cli" in cmdline:
            found.append(int(stat.split("/")[2]))
    return found


def test_a_terminated_bench_stops_its_source_vmm() -> None:
    """SIGTERM to the bench alone (not its process group): its source VMM goes too."""
    bench = subprocess.Popen([sys.executable, "-m", "postcopy.cli", "bench", "--sections", "fetch", "--quick"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (sources := _children(bench.pid)) and time.monotonic() < deadline and bench.poll() is None:
            time.sleep(0.05)
        assert sources, "the bench started no source VMM"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(30) == 128 + signal.SIGTERM  # unwound, not killed by the signal
        deadline = time.monotonic() + 10  # stopped by the bench, or by the kernel as it exited
        while any(map(running, sources)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(running, sources))
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()


def test_a_polling_fetch_is_also_set_against_a_polling_ping_pong() -> None:
    result = {"socket": {"p50": 60.0}, "vcpus": {"1": {"p50": 50.0, "no_poll": {"p50": 90.0}}, "2": {"p50": 40.0}}}
    out = fetch._like_for_like(result, [20_000] * 10)
    assert out["socket_polled"]["p50"] == 20.0
    assert out["vcpus"]["1"]["ratio_p50_to_polled_socket"] == 2.5
    assert out["vcpus"]["1"]["no_poll"]["ratio_p50_to_socket"] == 1.5
    assert "ratio_p50_to_polled_socket" not in out["vcpus"]["2"]  # two vCPUs do not poll
    assert fetch._like_for_like({"vcpus": {}}, []) == {"vcpus": {}}  # nothing polled: nothing added
