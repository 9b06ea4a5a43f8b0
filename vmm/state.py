"""Capture and restore of a running VM's state: every vCPU, the in-kernel irqchip, PIT and
clock, and the devices. The VM must be paused (vmm.machine.Machine.pause) for capture.

Each kernel struct travels as its raw bytes (proto.VcpuState); restore checks sizes, so a blob
from a host with another layout fails with a clear error instead of being misread.
"""
from __future__ import annotations

import ctypes
from typing import TypeVar

import msgpack

from proto import VcpuState, VmState
from vmm.abi import kvm as abi
from vmm.kvm import KvmError, Vcpu, Vm
from vmm.machine import Machine

T = TypeVar("T", bound=ctypes.Structure)
IRQCHIPS = (abi.KVM_IRQCHIP_PIC_MASTER, abi.KVM_IRQCHIP_PIC_SLAVE, abi.KVM_IRQCHIP_IOAPIC)
MSR_ENTRY = ctypes.sizeof(abi.kvm_msr_entry)


class StateError(Exception):
    """State that cannot be captured or restored; the message names the vCPU and the part."""


def _load(kind: type[T], blob: bytes, what: str) -> T:
    if len(blob) != ctypes.sizeof(kind):
        raise StateError(f"{what}: {len(blob)} bytes, struct {kind.__name__} here is {ctypes.sizeof(kind)}")
    return kind.from_buffer_copy(blob)


def pack_msrs(msrs: list[tuple[int, int]]) -> bytes:
    return b"".join(bytes(abi.kvm_msr_entry(index=i, data=v)) for i, v in msrs)


def unpack_msrs(blob: bytes) -> list[tuple[int, int]]:
    if len(blob) % MSR_ENTRY:
        raise StateError(f"MSR blob of {len(blob)} bytes is not a whole number of kvm_msr_entry")
    entries = (abi.kvm_msr_entry * (len(blob) // MSR_ENTRY)).from_buffer_copy(blob)
    return [(e.index, e.data) for e in entries]


def capture_vcpu(vcpu: Vcpu, msr_indices: list[int]) -> VcpuState:
    return VcpuState(
        id=vcpu.id,
        regs=bytes(vcpu.get_regs()),
        sregs=bytes(vcpu.get_sregs()),
        fpu=bytes(vcpu.get_fpu()),
        xsave=vcpu.get_xsave(),
        xcrs=bytes(vcpu.get_xcrs()),
        lapic=bytes(vcpu.get_lapic()),
        events=bytes(vcpu.get_vcpu_events()),
        mp_state=bytes(vcpu.get_mp_state()),
        debugregs=bytes(vcpu.get_debugregs()),
        cpuid=vcpu.get_cpuid2(),
        msrs=pack_msrs(vcpu.get_msrs(msr_indices)),
    )


def restore_vcpu(vcpu: Vcpu, state: VcpuState) -> None:
    """Order matters: CPUID before SREGS (long mode), SREGS before REGS, LAPIC before events."""
    what = f"vCPU {vcpu.id}"
    try:
        vcpu.set_cpuid2(state.cpuid)
        vcpu.set_sregs(_load(abi.kvm_sregs, state.sregs, f"{what} sregs"))
        vcpu.set_regs(_load(abi.kvm_regs, state.regs, f"{what} regs"))
        vcpu.set_fpu(_load(abi.kvm_fpu, state.fpu, f"{what} fpu"))
        vcpu.set_xsave(state.xsave)
        vcpu.set_xcrs(_load(abi.kvm_xcrs, state.xcrs, f"{what} xcrs"))
        vcpu.set_msrs(unpack_msrs(state.msrs))
        vcpu.set_lapic(_load(abi.kvm_lapic_state, state.lapic, f"{what} lapic"))
        vcpu.set_vcpu_events(_load(abi.kvm_vcpu_events, state.events, f"{what} events"))
        vcpu.set_mp_state(_load(abi.kvm_mp_state, state.mp_state, f"{what} mp_state"))
        vcpu.set_debugregs(_load(abi.kvm_debugregs, state.debugregs, f"{what} debugregs"))
    except KvmError as e:
        raise StateError(f"restoring {what}: {e}") from None


def capture_vm(vm: Vm) -> VmState:
    return VmState(clock=bytes(vm.get_clock()),
                   irqchip=tuple(bytes(vm.get_irqchip(c)) for c in IRQCHIPS),
                   pit2=bytes(vm.get_pit2()))


def restore_vm(vm: Vm, state: VmState) -> None:
    try:
        for blob in state.irqchip:
            vm.set_irqchip(_load(abi.kvm_irqchip, blob, "irqchip"))
        if state.pit2:
            vm.set_pit2(_load(abi.kvm_pit_state2, state.pit2, "PIT"))
        if state.clock:
            clock = _load(abi.kvm_clock_data, state.clock, "clock")
            clock.flags = 0  # only the guest clock value travels; the host parts are this host's
            vm.set_clock(clock)
    except KvmError as e:
        raise StateError(f"restoring VM state: {e}") from None


def capture_devices(machine: Machine) -> dict[str, bytes]:
    return {d.name: msgpack.packb(d.get_state(), use_bin_type=True) for d in machine.bus.devices}


def restore_devices(machine: Machine, blobs: dict[str, bytes]) -> None:
    for device in machine.bus.devices:
        if device.name not in blobs:
            raise StateError(f"no state for device {device.name!r} (got {sorted(blobs)})")
        try:
            device.set_state(msgpack.unpackb(blobs[device.name], raw=False))
        except (ValueError, KeyError, TypeError, msgpack.ExtraData) as e:
            raise StateError(f"bad state for device {device.name!r}: {e}") from None


def capture(machine: Machine) -> tuple[list[VcpuState], VmState, dict[str, bytes]]:
    """Everything but RAM, from a paused machine."""
    vcpus = [capture_vcpu(t.vcpu, machine.msr_indices) for t in machine.vcpus]
    return vcpus, capture_vm(machine.vm), capture_devices(machine)


def restore(machine: Machine, vcpus: list[VcpuState] | tuple[VcpuState, ...], vm_state: VmState,
            devices: dict[str, bytes]) -> None:
    """Load captured state into a machine built with the same config, before it starts."""
    if len(vcpus) != len(machine.vcpus):
        raise StateError(f"state has {len(vcpus)} vCPUs, this machine {len(machine.vcpus)}")
    restore_vm(machine.vm, vm_state)
    for thread, state in zip(machine.vcpus, sorted(vcpus, key=lambda s: s.id)):
        restore_vcpu(thread.vcpu, state)
    restore_devices(machine, devices)
