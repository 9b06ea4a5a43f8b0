"""vmm.state: capture a running guest, restore it into a fresh Machine in the same process, and
let it go on; the captured state travels through proto's MigrationHeader on the way."""
from __future__ import annotations

import ctypes
import dataclasses
import time
from collections.abc import Iterator

import pytest

from proto import MemoryRegion, MigrationHeader, VcpuState, VmState
from vmm import state as vmstate
from vmm.guest import workloads
from vmm.guest.layout import DATA_GPA, PAGE_SIZE, BootParams
from vmm.machine import Machine, MachineConfig
from vmm.state import StateError

pytestmark = pytest.mark.usefixtures("kvm_available")

GUEST_BYTES = 4 << 20  # this host emulates guest ring-0 code (~1.5 M instr/s): memtouch needs a small guest
WAIT_S = 10.0
RUN_AFTER_RESTORE_S = 1.0


class Machines:
    def __init__(self) -> None:
        self.all: list[Machine] = []

    def create(self, nvcpus: int) -> Machine:
        m = Machine.create(MachineConfig(GUEST_BYTES, nvcpus))
        self.all.append(m)
        return m

    def boot(self, workload: str, nvcpus: int, **plan: object) -> tuple[Machine, list[BootParams]]:
        program, params = workloads.plan(workload, GUEST_BYTES, nvcpus, 0x5EED, report_every=64, **plan)
        m = self.create(nvcpus)
        m.boot(program, params)
        return m, params


@pytest.fixture
def machines() -> Iterator[Machines]:
    ms = Machines()
    yield ms
    for m in ms.all:
        m.close()


def _through_proto(machine: Machine, vcpus: list[VcpuState], vm_state: VmState,
                   devices: dict[str, bytes]) -> MigrationHeader:
    """Encodes the captured state in a MigrationHeader and decodes it again."""
    header = MigrationHeader(
        migration_id="test-state", page_size=PAGE_SIZE,
        regions=tuple(MemoryRegion(r.gpa, r.size) for r in machine.memory.regions),
        vcpus=tuple(vcpus), vm_state=vm_state, devices=devices, eager=(),
        paused_at_ns=time.monotonic_ns(), boot_id="boot", workload={},
    )
    return MigrationHeader.decode(header.encode())


def _copy_ram(src: Machine, dst: Machine) -> None:
    for a, b in zip(src.memory.regions, dst.memory.regions, strict=True):
        assert (a.gpa, a.size) == (b.gpa, b.size)
        ctypes.memmove(b.hva, a.hva, a.size)


@pytest.mark.parametrize("nvcpus", [1, 2])
def test_memtouch_captured_and_restored_into_a_fresh_machine_keeps_verifying(machines: Machines, nvcpus: int) -> None:
    src, params = machines.boot("memtouch", nvcpus)
    src.start()
    ok = src.services.wait_for(lambda: all(p.reports >= 2 for p in src.services.progress), WAIT_S)
    src.check()
    assert ok, f"memtouch did not report: {[p.reports for p in src.services.progress]}"
    src.pause()
    before = [p.verified for p in src.services.progress]
    assert all(v > 0 for v in before) and src.services.errors == 0
    header = _through_proto(src, *vmstate.capture(src))

    dst = machines.create(nvcpus)
    _copy_ram(src, dst)
    src.close()  # the source is gone: only the copied RAM and the header remain
    vmstate.restore(dst, header.vcpus, header.vm_state, header.devices)
    assert [p.verified for p in dst.services.progress] == before  # device state came along
    dst.start()
    time.sleep(RUN_AFTER_RESTORE_S)
    assert dst.services.sweep(WAIT_S), "the restored guest did not finish a sweep"
    dst.pause()
    dst.check()
    for i, (p, bp) in enumerate(zip(dst.services.progress, params)):
        assert p.verified > before[i], f"vCPU {i} did not go on verifying after restore"
        assert p.sweep_pages == bp.npages, f"vCPU {i} swept {p.sweep_pages} of {bp.npages} pages"
        assert p.errors == 0 and p.sweep_errors == 0 and not p.page_errors and not p.exceptions


@pytest.mark.parametrize("nvcpus", [1, 2])
def test_touch_booted_then_restored_into_a_fresh_machine_runs_there(machines: Machines, nvcpus: int) -> None:
    """Capture before the first instruction: the destination runs the whole workload."""
    src, params = machines.boot("touch", nvcpus, write=True)
    vcpus, vm_state, devices = vmstate.capture(src)
    dst = machines.create(nvcpus)
    _copy_ram(src, dst)
    vmstate.restore(dst, vcpus, vm_state, devices)
    dst.start()
    done = dst.services.wait_for(lambda: all(p.done_pages >= 0 for p in dst.services.progress), WAIT_S)
    dst.check()
    assert done, f"done_pages {[p.done_pages for p in dst.services.progress]}"
    assert [p.done_pages for p in dst.services.progress] == [p.npages for p in params]
    assert dst.memory.read(DATA_GPA, 8) == DATA_GPA.to_bytes(8, "little")
    assert src.memory.read(DATA_GPA, 8) == bytes(8)  # the source never ran


def test_captured_state_encodes_and_decodes_through_proto_unchanged(machines: Machines) -> None:
    src, _ = machines.boot("touch", 2)
    vcpus, vm_state, devices = vmstate.capture(src)
    assert [v.id for v in vcpus] == [0, 1]
    assert len(vm_state.irqchip) == 3 and vm_state.clock and vm_state.pit2
    assert set(devices) == {"uart", "guest_services"}
    decoded = _through_proto(src, vcpus, vm_state, devices)
    assert decoded.vcpus == tuple(vcpus)
    assert decoded.vm_state == vm_state
    assert decoded.devices == devices


def test_captured_vcpu_state_holds_the_booted_registers(machines: Machines) -> None:
    src, _ = machines.boot("touch", 1)
    [vcpu] = vmstate.capture(src)[0]
    regs = vmstate.abi.kvm_regs.from_buffer_copy(vcpu.regs)
    sregs = vmstate.abi.kvm_sregs.from_buffer_copy(vcpu.sregs)
    assert regs.rip == workloads.program("touch").entry_gpa
    assert sregs.efer & vmstate.abi.EFER_LMA and sregs.cr0 & vmstate.abi.X86_CR0_PG
    assert len(vcpu.msrs) == 16 * len(src.msr_indices)


@pytest.mark.parametrize("part", ["regs", "sregs", "fpu", "xcrs", "lapic", "events", "mp_state", "debugregs"])
def test_restore_rejects_a_blob_of_the_wrong_size_with_state_error(machines: Machines, part: str) -> None:
    src, _ = machines.boot("touch", 1)
    vcpus, vm_state, devices = vmstate.capture(src)
    bad = dataclasses.replace(vcpus[0], **{part: getattr(vcpus[0], part)[:-1]})
    dst = machines.create(1)
    with pytest.raises(StateError, match=part):
        vmstate.restore(dst, [bad], vm_state, devices)


def test_restore_rejects_an_xsave_of_the_wrong_size_with_state_error(machines: Machines) -> None:
    src, _ = machines.boot("touch", 1)
    vcpus, vm_state, devices = vmstate.capture(src)
    bad = dataclasses.replace(vcpus[0], xsave=vcpus[0].xsave + b"\0" * 8)
    with pytest.raises(StateError, match="XSAVE"):
        vmstate.restore(machines.create(1), [bad], vm_state, devices)


def test_restore_rejects_guest_services_state_for_another_number_of_vcpus(machines: Machines) -> None:
    """A device state whose per-vCPU progress does not match this machine's vCPUs is refused at
    the restore, not found later by a vCPU's report indexing past it."""
    import msgpack

    src, _ = machines.boot("touch", 1)
    vcpus, vm_state, devices = vmstate.capture(src)
    name = next(n for n in devices if msgpack.unpackb(devices[n], raw=False).get("progress") is not None)
    state = msgpack.unpackb(devices[name], raw=False)
    state["progress"] = state["progress"] * 2
    with pytest.raises(StateError, match="progress of 2 vCPUs for a machine of 1"):
        vmstate.restore(machines.create(1), vcpus, vm_state, {**devices, name: msgpack.packb(state)})


def test_restore_rejects_a_torn_msr_blob_and_a_wrong_irqchip(machines: Machines) -> None:
    src, _ = machines.boot("touch", 1)
    vcpus, vm_state, devices = vmstate.capture(src)
    torn_msrs = dataclasses.replace(vcpus[0])
    object.__setattr__(torn_msrs, "msrs", vcpus[0].msrs[:-4])  # proto would refuse it: state must too
    with pytest.raises(StateError, match="kvm_msr_entry"):
        vmstate.restore(machines.create(1), [torn_msrs], vm_state, devices)
    torn = VmState(clock=vm_state.clock, irqchip=(vm_state.irqchip[0][:100],), pit2=vm_state.pit2)
    with pytest.raises(StateError, match="irqchip"):
        vmstate.restore(machines.create(1), vcpus, torn, devices)


def test_restore_rejects_a_different_vcpu_count_and_missing_devices(machines: Machines) -> None:
    src, _ = machines.boot("touch", 2)
    vcpus, vm_state, devices = vmstate.capture(src)
    with pytest.raises(StateError, match="2 vCPUs, this machine 1"):
        vmstate.restore(machines.create(1), vcpus, vm_state, devices)
    with pytest.raises(StateError, match="uart"):
        vmstate.restore(machines.create(2), vcpus, vm_state, {"guest_services": devices["guest_services"]})
