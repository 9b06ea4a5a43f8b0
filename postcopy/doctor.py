"""`postcopy doctor`: what this host's KVM and userfaultfd do, found by trying them.

The fault-exit probe boots a tiny guest whose data pages are missing from a
UFFD_FEATURE_SIGBUS-registered RAM and records how each access comes back: that is the
evidence `--fault-mode auto` decides on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from postcopy import hostinfo
from postcopy.destination import private_loop
from postcopy.faults import FAULT_KIND_NAMES, FaultDecoder, FaultError
from vmm.abi import kvm as kabi
from vmm.abi.userfaultfd import UFFD_FEATURE_NAMES, UFFD_FEATURE_SIGBUS, UFFDIO_ZEROPAGE_MODE_DONTWAKE
from vmm.guest import workloads
from vmm.guest.layout import DATA_GPA, PAGE_SIZE
from vmm.kvm import Kvm, KvmError
from vmm.machine import Machine, MachineConfig, MachineError
from vmm.memory import GuestMemory
from vmm.uffd import Uffd, UffdError
from vmm.vcpu import VcpuThread

PROBE_MEM = 4 << 20
PROBE_TIMEOUT_S = 10.0
CAP_PREFIX = "KVM_CAP_"


@dataclass(slots=True)
class DoctorReport:
    # kernel, paging and kvm_module are also in host; they stay at the top of the JSON for its readers
    kernel: str
    kvm: bool
    kvm_api: int | None = None
    kvm_error: str | None = None
    paging: str = "unknown"  # "shadow" or "two-dimensional (EPT/NPT)"
    kvm_module: str | None = None
    caps: dict[str, int] = field(default_factory=dict)
    uffd: bool = False
    uffd_error: str | None = None
    uffd_features: list[str] = field(default_factory=list)
    fault_exits: dict[str, int] = field(default_factory=dict)  # by kind, from the probe guest
    probe_pages: int = 0
    probe_error: str | None = None
    exit_mode_works: bool = False
    recommended_fault_mode: str = "classic"
    reason: str = ""
    host: hostinfo.HostInfo | None = None  # CPUs, how idle CPUs wait: what moves the figures
    # Why the one-page fault loops (exit mode's vCPUs', classic's handlers') cannot run under a
    # GIL each (postcopy.destination.private_loop), or None where they can.
    private_loops_unavailable: str | None = None


class _ProbeResolver:
    """Installs a zero page for every missing page the probe guest touches, counting exits."""

    def __init__(self, uffd: Uffd, memory: GuestMemory) -> None:
        self.uffd, self.memory = uffd, memory
        self.decoder = FaultDecoder(memory)
        self.kinds: dict[str, int] = {}

    def on_fault_exit(self, thread: VcpuThread, ret: int) -> bool:
        fault = self.decoder.decode(thread, ret)
        if fault is None:
            return False
        length = fault.npages * PAGE_SIZE
        self.uffd.zeropage(self.memory.hva(fault.first_gpa, length), length, UFFDIO_ZEROPAGE_MODE_DONTWAKE)
        self.decoder.complete(thread, fault)
        name = FAULT_KIND_NAMES[fault.kind]
        self.kinds[name] = self.kinds.get(name, 0) + 1
        return True


def probe_fault_exits(report: DoctorReport) -> None:
    """Boot `touch` (read) with every data page missing and see how the faults come back."""
    program, params = workloads.plan("touch", PROBE_MEM, 1, 1)
    uffd = Uffd(UFFD_FEATURE_SIGBUS)
    machine = None
    try:
        memory = GuestMemory.create(PROBE_MEM)
        uffd.register(memory.regions[0].hva, memory.size)
        uffd.zeropage(memory.hva(0, DATA_GPA), DATA_GPA)  # the boot region is present; data is not
        machine = Machine.create(MachineConfig(PROBE_MEM, 1), memory=memory)
        machine.boot(program, params)
        resolver = _ProbeResolver(uffd, memory)
        machine.vcpus[0].fault_handler = resolver
        machine.vcpus[0].block_sigbus = True
        machine.start()
        ok = machine.services.wait_for(lambda: machine.services.progress[0].done_pages >= 0, PROBE_TIMEOUT_S)
        machine.pause()
        report.fault_exits = resolver.kinds
        report.probe_pages = params[0].npages
        if not ok:
            report.probe_error = "the probe guest did not finish: " + ("; ".join(machine.failures()) or "timeout")
        elif machine.services.progress[0].done_pages != params[0].npages:
            report.probe_error = f"the probe guest touched {machine.services.progress[0].done_pages} of {params[0].npages} pages"
        else:
            report.exit_mode_works = sum(resolver.kinds.values()) >= params[0].npages
    except (MachineError, UffdError, KvmError, FaultError) as e:
        report.probe_error = str(e)
    finally:
        if machine is not None:
            machine.close()
        uffd.close()


def diagnose(run_probe: bool = True) -> DoctorReport:
    host = hostinfo.describe()
    report = DoctorReport(kernel=host.kernel, kvm=False, paging=host.paging, kvm_module=host.kvm_module, host=host,
                          private_loops_unavailable=private_loop.unavailable())
    try:
        kvm = Kvm()
        report.kvm = True
        report.kvm_api = kvm.get_api_version()
        for name in ("KVM_CAP_IRQCHIP", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_XSAVE2", "KVM_CAP_MEMORY_FAULT_INFO",
                     "KVM_CAP_USER_MEMORY2", "KVM_CAP_TSC_CONTROL", "KVM_CAP_MAX_VCPUS"):
            report.caps[name] = kvm.check_extension(getattr(kabi, name))
        kvm.close()
    except KvmError as e:
        report.kvm_error = str(e)
    try:
        features = Uffd.available_features()
        report.uffd = True
        report.uffd_features = [n for bit, n in sorted(UFFD_FEATURE_NAMES.items()) if features & bit]
    except UffdError as e:
        report.uffd_error = str(e)
    if report.kvm and report.uffd and "UFFD_FEATURE_SIGBUS" in report.uffd_features and run_probe:
        probe_fault_exits(report)
    if report.exit_mode_works:
        kinds = ", ".join(f"{n} {k}" for k, n in report.fault_exits.items())
        report.recommended_fault_mode = "exit"
        report.reason = f"a vCPU touching missing pages came back to userspace every time ({kinds})"
    elif not report.kvm:
        report.reason = "no usable /dev/kvm"
    elif not report.uffd:
        report.reason = "no usable userfaultfd"
    elif "UFFD_FEATURE_SIGBUS" not in report.uffd_features:
        report.reason = "userfaultfd here does not offer UFFD_FEATURE_SIGBUS"
    else:
        report.reason = f"the fault-exit probe failed: {report.probe_error}"
    return report


def as_dict(report: DoctorReport) -> dict:
    return asdict(report)


def render(report: DoctorReport) -> str:
    lines = [
        f"kernel            {report.kernel}",
        *([f"host              {report.host.machine()}",
           f"idle CPUs         {report.host.idle()}"] if report.host is not None else []),
        f"KVM               {'API ' + str(report.kvm_api) if report.kvm else 'absent: ' + str(report.kvm_error)}"
        f"{' (' + report.kvm_module + ')' if report.kvm_module else ''}",
        f"paging            {report.paging}",
        f"capabilities      {', '.join(f'{k.removeprefix(CAP_PREFIX)}={v}' for k, v in report.caps.items())}",
        f"userfaultfd       {'features ' + ' '.join(f.removeprefix('UFFD_FEATURE_') for f in report.uffd_features) if report.uffd else 'absent: ' + str(report.uffd_error)}",
        f"fault exits       {report.fault_exits or '-'} over {report.probe_pages} missing pages"
        f"{'' if not report.probe_error else ' (' + report.probe_error + ')'}",
        f"fault mode        {report.recommended_fault_mode}: {report.reason}",
        f"fault loops       {'a private interpreter per CPU the vCPUs (exit) or handlers (classic) run on, ~18 MiB each' if report.private_loops_unavailable is None else 'under one GIL: ' + report.private_loops_unavailable}",
    ]
    return "\n".join(lines)
