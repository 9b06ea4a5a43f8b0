"""What host a measurement ran on: the facts that move this project's figures, read from /proc
and /sys (nothing is probed or changed). `postcopy bench` puts them in its JSON and its table,
`postcopy doctor` in its report, so that figures from two hosts can be told apart.

What moves the figures (docs/performance.md): how many CPUs this process may use (vCPUs and
handlers are placed on them), whether this host is itself a VM and how KVM pages its guests
(here nested, with shadow paging: every fault exit is an emulated access), and how an idle CPU
waits. A CPU that halts at once, with no polling (cpuidle's haltpoll with
``guest_halt_poll_ns=0``, as here), is woken through the host beneath: every wake-up of a
sleeping thread on another CPU (a naive uffd handler's, a GIL hand-off's, a socket's) costs
tens of microseconds.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class HostInfo:
    kernel: str
    python: str
    cpus: int  # CPUs this process may run on (its affinity), which placement uses
    cpus_online: int | None
    cpu_model: str | None
    virtualized: bool  # the CPU's "hypervisor" flag: KVM here runs nested
    kvm_module: str | None
    paging: str  # "shadow", "two-dimensional (EPT/NPT)" or "unknown"
    cpuidle_driver: str | None
    cpuidle_governor: str | None
    guest_halt_poll_ns: int | None  # the haltpoll governor's polling before a halt; None: another governor
    transparent_hugepage: str | None

    def summary(self) -> str:
        """One line for a table: CPUs, kernel, Python, KVM's paging, how idle CPUs wait."""
        return (f"{self.machine()}, Linux {self.kernel}, KVM {self.kvm_module or '?'} with {self.paging} paging, "
                f"idle CPUs: {self.idle()}")

    def machine(self) -> str:
        model = f" ({self.cpu_model})" if self.cpu_model else ""
        return f"{self.cpus} CPUs{model}{' in a VM' if self.virtualized else ''}, Python {self.python}"

    def idle(self) -> str:
        if self.cpuidle_driver is None:
            return "unknown"
        if self.guest_halt_poll_ns is not None:
            poll = ("no polling before a halt" if self.guest_halt_poll_ns == 0 else
                    f"polls up to {self.guest_halt_poll_ns} ns before a halt")
            return f"{self.cpuidle_driver} ({poll})"
        return self.cpuidle_driver


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def paging() -> str:
    """How KVM maps its guests' memory: two-dimensional where EPT/NPT is on; shadow where the
    TDP MMU is off and neither is on (a nested host such as this one)."""
    for module, param in (("kvm_intel", "ept"), ("kvm_amd", "npt")):
        if _read(f"/sys/module/{module}/parameters/{param}") in ("Y", "1"):
            return "two-dimensional (EPT/NPT)"
    return "shadow" if _read("/sys/module/kvm/parameters/tdp_mmu") == "N" else "unknown"


def kvm_module() -> str | None:
    for module in ("kvm_intel", "kvm_amd", "kvm_pvm"):
        if os.path.isdir(f"/sys/module/{module}"):
            return module
    return None


def _cpuinfo() -> tuple[str | None, bool]:
    """The first CPU's model name and whether its flags name a hypervisor."""
    model, flags = None, ""
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key == "flags":
            flags = value
            break
    return model, "hypervisor" in flags.split()


def _selected(text: str | None) -> str | None:
    """The bracketed choice of a sysfs setting such as ``always [madvise] never``."""
    if text is None:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else text


def describe() -> HostInfo:
    model, virtualized = _cpuinfo()
    cpuidle = "/sys/devices/system/cpu/cpuidle"
    governor = _read(f"{cpuidle}/current_governor") or _read(f"{cpuidle}/current_governor_ro")
    # the haltpoll governor's parameter: how long an idle CPU polls before it halts
    poll = _read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") if governor == "haltpoll" else None
    return HostInfo(
        kernel=platform.release(),
        python=platform.python_version(),
        cpus=len(os.sched_getaffinity(0)),
        cpus_online=os.cpu_count(),
        cpu_model=model,
        virtualized=virtualized,
        kvm_module=kvm_module(),
        paging=paging(),
        cpuidle_driver=_read(f"{cpuidle}/current_driver"),
        cpuidle_governor=governor,
        guest_halt_poll_ns=int(poll) if poll is not None and poll.isdigit() else None,
        transparent_hugepage=_selected(_read("/sys/kernel/mm/transparent_hugepage/enabled")),
    )
