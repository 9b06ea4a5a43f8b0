"""The page-in bench: every mode pages in every data page of a real guest through the
destination's fault paths and the guest's check passes; a wrong page is caught; the C limit
builds and runs (or says why not); `postcopy bench --json` has the keys the issue names."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import threading
from array import array

import pytest

from postcopy import cli
from postcopy.bench import BenchError, BenchOptions, limit, pagein, paired_ratio, runner
from postcopy.bench.source import SourceImage
from postcopy.destination import classic_mode, exit_mode, private_loop
from postcopy.destination.pages import PRESENT, Arrival, PageTracker
from vmm import interp
from vmm.guest.layout import DATA_GPA, PAGE_SIZE

pytestmark = pytest.mark.usefixtures("kvm_available", "uffd_available")
MEM = 8 << 20  # 1536 data pages


@pytest.fixture(scope="module")
def image() -> SourceImage:
    return SourceImage(MEM)


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("mode", pagein.MODES)
def test_every_mode_pages_in_every_page_and_the_guest_check_passes(image: SourceImage, mode: str, vcpus: int) -> None:
    rate = pagein.run_python(image, mode, vcpus)  # raises BenchError if any check fails
    assert rate > 0


@pytest.mark.parametrize("loop", ["private", "shared"])
def test_the_exit_mode_loop_takes_every_fault_of_the_touch_guest_itself(image: SourceImage, loop: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The touch guest's faults are all this host's usual one (an aligned qword read, then
    # written): the vCPU's loop resolves each itself, in its private interpreter
    # (private_fault_loop.py) or in ExitModeResolver._run, and the general handler only sees
    # the kicks that stop the vCPUs. What the loop inlines keeps the books as the general path
    # does: every page counted once, as demanded, each fault logged, and the guest complete.
    if loop == "private" and private_loop.unavailable() is not None:
        pytest.skip(f"no private fault loop here: {private_loop.unavailable()}")
    monkeypatch.setenv("POSTCOPY_PRIVATE_LOOPS", "1" if loop == "private" else "0")
    general, trackers = [], []
    on_fault_exit = exit_mode.ExitModeResolver.on_fault_exit
    monkeypatch.setattr(exit_mode.ExitModeResolver, "on_fault_exit",
                        lambda self, thread, ret: general.append(ret) or on_fault_exit(self, thread, ret))
    monkeypatch.setattr(pagein, "PageTracker", lambda memory: trackers.append(PageTracker(memory)) or trackers[-1])
    latencies = array("Q")
    pagein.run_python(image, "exit", 2, latencies)
    pages = pagein.data_pages(MEM)
    assert len(latencies) == pages and all(latencies)
    assert not [ret for ret in general if ret == 0]
    tracker, = trackers
    made_here = len(tracker.created)
    assert tracker.all_present.is_set() and tracker.counts[Arrival.DEMAND] == pages == tracker.present - DATA_GPA // PAGE_SIZE
    assert (made_here, len(tracker.makers)) == ((0, 2) if loop == "private" else (pages, 0))
    assert tracker.state.count(PRESENT) == tracker.npages and tracker.arrival.count(Arrival.DEMAND) == pages


@pytest.mark.parametrize("loop", ["private", "shared"])
@pytest.mark.parametrize("vcpus", [1, 2])
def test_the_classic_handler_loop_serves_a_read_of_one_fault_itself(image: SourceImage, vcpus: int, loop: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A read of one fault message, one page a fault, is served in the handler's loop (in its
    # private interpreter, private_handler_loop.py, or in ClassicHandler._main), never by
    # _serve; and the books are kept: every page counted once, as demanded, each fault logged.
    if loop == "private" and private_loop.unavailable() is not None:
        pytest.skip(f"no private loop here: {private_loop.unavailable()}")
    monkeypatch.setenv("POSTCOPY_PRIVATE_LOOPS", "1" if loop == "private" else "0")
    served: list[int] = []
    serve = classic_mode.ClassicHandler._serve
    monkeypatch.setattr(classic_mode.ClassicHandler, "_serve",
                        lambda self, h, t0: served.append(t0) or serve(self, h, t0))
    trackers: list[PageTracker] = []
    monkeypatch.setattr(pagein, "PageTracker", lambda memory: trackers.append(PageTracker(memory)) or trackers[-1])
    latencies = array("Q")
    pagein.run_python(image, "classic", vcpus, latencies)
    pages = pagein.data_pages(MEM)
    assert not served
    assert len(latencies) == pages and all(latencies)
    tracker, = trackers
    made_here = len(tracker.created)
    assert tracker.all_present.is_set() and tracker.counts[Arrival.DEMAND] == pages == tracker.present - DATA_GPA // PAGE_SIZE
    assert len(tracker.makers) == (len(classic_mode.handler_cpus(vcpus)) if loop == "private" else 0)
    assert made_here == (pages - sum(m.made for m in tracker.makers) if loop == "private" else pages)
    assert tracker.state.count(PRESENT) == tracker.npages and tracker.arrival.count(Arrival.DEMAND) == pages


@pytest.mark.parametrize("mode", ["classic", "classic-naive"])
def test_the_bench_sets_up_classic_as_the_destination_does(image: SourceImage, mode: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Each fault message names its thread (UFFD_FEATURE_THREAD_ID) and the handler knows the
    # vCPU threads, as in Destination.prepare: every fault is logged against its vCPU through
    # the handler's one-entry cache. A handler set up without them would log each fault
    # against no vCPU, through a slower path, and understate classic against exit.
    logs: list[dict[int, int]] = []
    close = classic_mode.ClassicHandler.close
    monkeypatch.setattr(classic_mode.ClassicHandler, "close", lambda self: logs.append(
        {vcpu: len(fl) for vcpu, fl in self.fault_logs().items()}) or close(self))
    pagein.run_python(image, mode, 2)
    by_vcpu, = logs
    assert classic_mode.UNKNOWN_VCPU not in by_vcpu
    assert set(by_vcpu) == {0, 1} and sum(by_vcpu.values()) == pagein.data_pages(MEM)


def test_rounds_alternate_their_order_and_the_switch_interval_is_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every other round runs its configurations in the opposite order (C before Python,
    # classic before exit), so what one run leaves behind meets both sides alike.
    order: list[tuple[str, str]] = []

    class FakeLimit:
        def run(self, dump: str, mode: str) -> float:
            order.append(("C", mode))
            return 1.0

    monkeypatch.setattr(pagein, "run_python", lambda image, mode, v, ns=None: order.append(("python", mode)) or 1.0)
    monkeypatch.setattr(pagein, "SourceImage", lambda size: object())
    monkeypatch.setattr(pagein.costs, "measure", lambda image: {})
    monkeypatch.setattr(limit.Limit, "build", classmethod(lambda cls: FakeLimit()))
    monkeypatch.setattr(limit, "dump_guest", lambda size, v: "dump")
    monkeypatch.setattr(limit, "remove_dump", lambda path: None)
    original = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        pagein.measure(BenchOptions(sections=("pagein", "limit"), vcpus=(1,), repeat=3))
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        sys.setswitchinterval(original)
    n = 2 * len(pagein.MODES)
    warmup, first, second, third = (order[i * n:(i + 1) * n] for i in range(4))
    assert len(order) == 4 * n and first == warmup == third and second == first[::-1]
    assert first[:2] == [("python", "exit"), ("C", "exit")]


def test_a_wrong_page_from_the_source_fails_the_guest_check() -> None:
    bad = SourceImage(MEM)
    gpa = DATA_GPA + 100 * PAGE_SIZE
    bad.buffer[gpa:gpa + 8] = (gpa + PAGE_SIZE).to_bytes(8, "little")
    with pytest.raises(BenchError, match="found 1 wrong"):
        pagein.run_python(bad, "exit", 1)


def test_classic_handlers_are_pinned_to_the_vcpus_cpus(image: SourceImage, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[set[int]] = []
    log_of = classic_mode.ClassicHandler._log_of  # on the handler thread, in either loop

    def spy(self, h, tid):  # type: ignore[no-untyped-def]
        if len(seen) < 64:
            seen.append(os.sched_getaffinity(threading.get_native_id()))
        return log_of(self, h, tid)

    monkeypatch.setattr(classic_mode.ClassicHandler, "_log_of", spy)
    pagein.run_python(image, "classic", 2)
    cpus = classic_mode.handler_cpus(2)
    assert seen and all(len(s) == 1 and s <= set(cpus) for s in seen)


@pytest.fixture(scope="module")
def c_limit(tmp_path_factory: pytest.TempPathFactory) -> limit.Limit:
    try:
        return limit.Limit.build()
    except limit.LimitUnavailable as e:
        pytest.skip(f"the C limit cannot be built here: {e}")


@pytest.mark.parametrize("vcpus", [1, 2])
def test_the_c_limit_runs_the_same_guest_in_every_mode(c_limit: limit.Limit, vcpus: int) -> None:
    dump = limit.dump_guest(MEM, vcpus)
    try:
        for mode in pagein.MODES:
            report = c_limit.run_report(dump, mode)
            assert report["pages"] == report["visited"] == pagein.data_pages(MEM)
            assert report["mismatches"] == report["wrong_after"] == 0 and report["pages_per_s"] > 0
    finally:
        limit.remove_dump(dump)


def test_another_compiler_builds_its_own_limit(c_limit: limit.Limit, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # The cache is keyed by the compiler too: a binary built by one is not reused for another.
    cc = tmp_path / "other-cc"
    cc.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && {{ echo other-cc 1.0; exit 0; }}\nexec {c_limit_cc()} \"$@\"\n")
    cc.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = limit.Limit.build().binary
    monkeypatch.setenv("CC", str(cc))
    other = limit.Limit.build().binary
    assert first != other and first.exists() and other.exists()
    assert limit.Limit.build().binary == other  # and reused for the same one


def c_limit_cc() -> str:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"


def test_exit_is_compared_with_the_best_classic_paired_by_round() -> None:
    runs = {"exit": {"1": [60.0, 66.0, 70.0], "4": [50.0, 40.0, 45.0]},
            "classic": {"1": [40.0, 44.0, 50.0], "4": [30.0, 20.0, 25.0]},
            "classic-naive": {"1": [20.0], "4": [100.0]}}  # the first round only
    ratios, best = pagein.exit_against_best_classic(runs)
    assert best == {"1": "classic", "4": "classic-naive"}
    assert ratios["1"] == pytest.approx(1.5)  # median of 60/40, 66/44, 70/50
    assert ratios["4"] == pytest.approx(0.5)  # round 0's exit against naive's one run
    row = pagein.best_classic_row({"ratio_exit_classic": ratios, "best_classic": best})
    assert row.split()[4:6] == ["1.50", "0.50"] and "classic-naive at 4 vCPU" in row


def test_without_a_compiler_the_limit_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(limit.LimitUnavailable, match="no C compiler"):
        limit.Limit.build()


def _bench_json(*args: str) -> dict:
    out = io.StringIO()
    on_sigterm = signal.getsignal(signal.SIGTERM)
    with contextlib.redirect_stdout(out):
        assert cli.main(["bench", "--json", "--sections", "pagein,limit", "--mem", "8M", "--repeat", "1", *args]) == 0
    assert signal.getsignal(signal.SIGTERM) is on_sigterm  # the bench's own handler is gone with it
    return json.loads(out.getvalue())


def test_bench_json_has_the_pagein_and_limit_keys(c_limit: limit.Limit) -> None:
    users = dict(interp._users)
    d = _bench_json("--vcpus", "1,2")
    assert interp._users == users  # every private interpreter went back (the fault costs' resolver too)
    p, lim = d["pagein"], d["limit"]
    for v in ("1", "2"):
        for mode in pagein.MODES:
            assert p[mode][v] > 0 and lim[mode][v] > 0
            assert p["ratio_to_limit"][mode][v] == pytest.approx(p[mode][v] / lim[mode][v], rel=1e-2)
        best = p["best_classic"][v]
        assert p[best][v] == max(p[m][v] for m in pagein.CLASSIC_MODES)
        assert p["ratio_exit_classic"][v] == pytest.approx(p["exit"][v] / p[best][v], rel=1e-2)
        assert lim["best_classic"][v] in pagein.CLASSIC_MODES
    # Issue 10's targets from this run's own figures (the sections' part of them).
    checked = {c["target"]: c for c in d["targets"]}
    assert checked["pagein exit, Python / C, 2 vCPUs"]["value"] == pytest.approx(p["ratio_to_limit"]["exit"]["2"], abs=1e-3)
    assert not any(name.startswith(("fetch", "stream", "migrate")) for name in checked)


def test_bench_json_without_a_compiler_leaves_the_limit_out(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = _bench_json("--vcpus", "1")
    assert "no C compiler" in d["limit"]["skipped"]
    assert "ratio_to_limit" not in d["pagein"] and d["pagein"]["exit"]["1"] > 0


def test_bench_rejects_an_unknown_section() -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["bench", "--sections", "pagein,bogus"]) == 1
    assert "unknown section(s) bogus" in err.getvalue()


def test_a_paired_ratio_is_the_median_of_the_rounds_ratios() -> None:
    # The host was slower in rounds 3 and 5: the ratio of the medians (40 / 50) would say 0.8.
    assert paired_ratio([45, 40, 20, 46, 22], [50, 50, 25, 50, 25]) == pytest.approx(0.88)
    assert paired_ratio([90, 90, 60], [100, 100, 60]) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="rounds of both"):
        paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.parametrize(("args", "repeat"), [([], runner.FULL_REPEAT), (["--quick"], runner.QUICK_REPEAT),
                                              (["--quick", "--repeat", "2"], 2)])
def test_quick_runs_repeat_more_unless_told(args: list[str], repeat: int) -> None:
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    assert runner.options(parser.parse_args(args)).repeat == repeat
