"""The host facts that bench and doctor report (postcopy/hostinfo.py)."""
from __future__ import annotations

import os
import platform
from dataclasses import replace

import pytest

from postcopy import doctor, hostinfo
from postcopy.bench import BenchOptions, runner


def fake_sysfs(monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> None:
    monkeypatch.setattr(hostinfo, "_read", lambda path: files.get(path))


def test_this_host_is_described_from_its_own_files() -> None:
    host = hostinfo.describe()
    assert host.kernel == platform.release() and host.python == platform.python_version()
    assert host.cpus == len(os.sched_getaffinity(0)) and host.cpus_online == os.cpu_count()
    assert host.paging in ("shadow", "two-dimensional (EPT/NPT)", "unknown")
    assert host.summary().startswith(f"{host.cpus} CPUs") and f"Linux {host.kernel}" in host.summary()


@pytest.mark.parametrize("files, paging", [
    ({"/sys/module/kvm_intel/parameters/ept": "Y", "/sys/module/kvm/parameters/tdp_mmu": "Y"}, "two-dimensional (EPT/NPT)"),
    ({"/sys/module/kvm_amd/parameters/npt": "1"}, "two-dimensional (EPT/NPT)"),
    ({"/sys/module/kvm_intel/parameters/ept": "N", "/sys/module/kvm/parameters/tdp_mmu": "N"}, "shadow"),
    ({"/sys/module/kvm/parameters/tdp_mmu": "N"}, "shadow"),  # kvm_pvm: no ept or npt parameter
    ({}, "unknown"),
])
def test_paging_is_read_from_the_kvm_modules_parameters(monkeypatch: pytest.MonkeyPatch,
                                                        files: dict[str, str], paging: str) -> None:
    fake_sysfs(monkeypatch, files)
    assert hostinfo.paging() == paging


def test_idle_cpus_say_whether_they_poll_before_they_halt(monkeypatch: pytest.MonkeyPatch) -> None:
    cpuidle = "/sys/devices/system/cpu/cpuidle"
    files = {f"{cpuidle}/current_driver": "haltpoll", f"{cpuidle}/current_governor": "haltpoll",
             "/sys/module/haltpoll/parameters/guest_halt_poll_ns": "0",
             "/sys/kernel/mm/transparent_hugepage/enabled": "always [madvise] never",
             "/proc/cpuinfo": "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu hypervisor sse\n"}
    fake_sysfs(monkeypatch, files)
    host = hostinfo.describe()
    assert (host.guest_halt_poll_ns, host.transparent_hugepage, host.cpu_model, host.virtualized) == (0, "madvise", "Some CPU", True)
    assert host.idle() == "haltpoll (no polling before a halt)"
    assert "(Some CPU) in a VM" in host.summary() and host.summary().endswith("idle CPUs: haltpoll (no polling before a halt)")
    assert replace(host, guest_halt_poll_ns=200000).idle() == "haltpoll (polls up to 200000 ns before a halt)"
    # the parameter is the haltpoll governor's: under another governor it says nothing
    fake_sysfs(monkeypatch, {**files, f"{cpuidle}/current_driver": "intel_idle", f"{cpuidle}/current_governor": "menu"})
    assert hostinfo.describe().idle() == "intel_idle"
    fake_sysfs(monkeypatch, {})
    host = hostinfo.describe()
    assert (host.idle(), host.cpu_model, host.virtualized, host.transparent_hugepage) == ("unknown", None, False, None)


def test_the_bench_names_its_host_first_in_the_json_and_the_table() -> None:
    result = runner.run(BenchOptions(sections=()))
    assert next(iter(result)) == "host" and result["host"]["cpus"] == len(os.sched_getaffinity(0))
    assert runner.table(result)[0] == f"host: {hostinfo.describe().summary()}"


def test_doctor_reports_the_host_with_its_idle_cpus() -> None:
    report = doctor.diagnose(run_probe=False)
    assert report.host == hostinfo.describe() and report.kernel == report.host.kernel
    assert doctor.as_dict(report)["host"]["cpus"] == report.host.cpus
    assert f"idle CPUs         {report.host.idle()}" in doctor.render(report).splitlines()
