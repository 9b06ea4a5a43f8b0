"""Fault-exit decoding for every exit kind: the synthetic SIGBUS of a patched kernel, upstream's
KVM_EXIT_MEMORY_FAULT, and this host's real MMIO and instruction-fetch exits."""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading

import pytest

from postcopy.faults import FaultDecoder, FaultError, FaultKind
from vmm import libc
from vmm.abi import kvm as kabi
from vmm.abi.userfaultfd import UFFD_FEATURE_SIGBUS
from vmm.guest import workloads
from vmm.guest.layout import CODE_GPA, DATA_GPA, PAGE_SIZE
from vmm.machine import Machine, MachineConfig
from vmm.memory import GuestMemory
from vmm.uffd import Uffd

MEM = 4 << 20
pytestmark = pytest.mark.usefixtures("kvm_available", "uffd_available")


@pytest.fixture
def machine():
    m = Machine.create(MachineConfig(MEM, 1))
    yield m
    m.close()


def _queue_sigbus(tid: int, addr: int) -> None:
    info = libc.siginfo_t(si_signo=signal.SIGBUS, si_code=libc.BUS_ADRERR, si_addr=addr)
    ret = libc.syscall(ctypes.c_long(libc.SYS_rt_tgsigqueueinfo), ctypes.c_int(os.getpid()), ctypes.c_int(tid),
                       ctypes.c_int(signal.SIGBUS), ctypes.byref(info))
    assert ret == 0, os.strerror(ctypes.get_errno())


def _decode_on_thread_with_sigbus(machine: Machine, addr: int | None, ret: int):
    """Block SIGBUS on a fresh thread, queue one to it as a patched kernel would (the kernel lets
    a thread queue a kernel-style siginfo only to itself), then decode there."""
    decoder = FaultDecoder(machine.memory)
    out: dict = {}

    def body() -> None:
        mask = libc.sigset_t.of(signal.SIGBUS)
        libc.pthread_sigmask(libc.SIG_BLOCK, ctypes.byref(mask), None)
        if addr is not None:
            _queue_sigbus(libc.gettid(), addr)
        try:
            out["fault"] = decoder.decode(machine.vcpus[0], ret)
        except FaultError as e:
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return out


def test_synthetic_sigbus_decodes_to_the_gpa_of_si_addr(machine: Machine) -> None:
    hva = machine.memory.hva(0x345000) + 0x678
    out = _decode_on_thread_with_sigbus(machine, hva, -errno.EFAULT)
    fault = out["fault"]
    assert fault.kind is FaultKind.SIGBUS
    assert (fault.first_gpa, fault.npages, fault.gpa) == (0x345000, 1, 0x345678)


def test_sigbus_after_eintr_is_found_too(machine: Machine) -> None:
    out = _decode_on_thread_with_sigbus(machine, machine.memory.hva(0x200000), -errno.EINTR)
    assert out["fault"].kind is FaultKind.SIGBUS and out["fault"].first_gpa == 0x200000


def test_plain_kick_without_sigbus_is_not_a_fault(machine: Machine) -> None:
    assert _decode_on_thread_with_sigbus(machine, None, -errno.EINTR)["fault"] is None


def test_sigbus_outside_guest_ram_is_an_error_not_a_fault(machine: Machine) -> None:
    buf = ctypes.create_string_buffer(PAGE_SIZE)
    out = _decode_on_thread_with_sigbus(machine, ctypes.addressof(buf), -errno.EFAULT)
    assert "outside guest RAM" in str(out["error"])


def test_memory_fault_exit_decodes_gpa_and_size(machine: Machine) -> None:
    run = machine.vcpus[0].vcpu.run_struct
    run.exit_reason = kabi.KVM_EXIT_MEMORY_FAULT
    run.memory_fault.gpa, run.memory_fault.size = 0x301ff8, 16  # crosses a page boundary
    fault = FaultDecoder(machine.memory).decode(machine.vcpus[0], -errno.EFAULT)
    assert fault is not None and fault.kind is FaultKind.MEMORY_FAULT
    assert (fault.first_gpa, fault.npages) == (0x301000, 2)


def test_memory_fault_outside_ram_is_an_error(machine: Machine) -> None:
    run = machine.vcpus[0].vcpu.run_struct
    run.exit_reason = kabi.KVM_EXIT_MEMORY_FAULT
    run.memory_fault.gpa, run.memory_fault.size = MEM + PAGE_SIZE, PAGE_SIZE
    with pytest.raises(FaultError, match="outside guest RAM"):
        FaultDecoder(machine.memory).decode(machine.vcpus[0], -errno.EFAULT)


def test_mmio_outside_ram_is_left_to_devices(machine: Machine) -> None:
    run = machine.vcpus[0].vcpu.run_struct
    run.exit_reason = kabi.KVM_EXIT_MMIO
    run.mmio.phys_addr, run.mmio.len = 0xFEE00000, 4
    assert FaultDecoder(machine.memory).decode(machine.vcpus[0], 0) is None


@pytest.mark.parametrize(("gpa", "length", "expected"), [
    (0x200008, 8, 0x200008),  # aligned qword in RAM: the fast path
    (MEM - 8, 8, MEM - 8),  # the last qword of RAM
    (0x200004, 8, -1),  # unaligned: may cross a page, decode() takes it
    (0x200008, 4, -1),  # not a qword
    (MEM, 8, -1),  # past RAM: real MMIO
    (0xFEE00000, 8, -1),
])
def test_qword_fast_path_takes_only_aligned_8_byte_accesses_inside_ram(machine: Machine, gpa: int, length: int,
                                                                        expected: int) -> None:
    run = machine.vcpus[0].vcpu.run_struct
    run.exit_reason, run.mmio.phys_addr, run.mmio.len = kabi.KVM_EXIT_MMIO, gpa, length
    assert FaultDecoder(machine.memory).qword_offset(machine.vcpus[0].vcpu) == expected


def test_qword_completion_reads_and_writes_guest_ram(machine: Machine) -> None:
    vcpu, decoder = machine.vcpus[0].vcpu, FaultDecoder(machine.memory)
    run = vcpu.run_struct
    machine.memory.write(0x200010, (0x1122334455667788).to_bytes(8, "little"))
    run.exit_reason, run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = kabi.KVM_EXIT_MMIO, 0x200010, 8, 0
    decoder.complete_qword(vcpu, decoder.qword_offset(vcpu))
    assert bytes(run.mmio.data) == (0x1122334455667788).to_bytes(8, "little")
    run.mmio.is_write = 1
    ctypes.memmove(run.mmio.data, (0xA5A5).to_bytes(8, "little"), 8)
    decoder.complete_qword(vcpu, decoder.qword_offset(vcpu))
    assert machine.memory.read(0x200010, 8) == (0xA5A5).to_bytes(8, "little")


class _ImageResolver:
    """Resolves faults from a local image of guest RAM: the real exit path minus the network."""

    def __init__(self, uffd: Uffd, memory: GuestMemory, image: bytes) -> None:
        self.uffd, self.memory, self.image = uffd, memory, image
        self.decoder = FaultDecoder(memory)
        self.kinds: dict[FaultKind, int] = {}

    def on_fault_exit(self, thread, ret: int) -> bool:
        fault = self.decoder.decode(thread, ret)
        if fault is None:
            return False
        length = fault.npages * PAGE_SIZE
        src = self.image[fault.first_gpa:fault.first_gpa + length]
        self.uffd.copy(self.memory.hva(fault.first_gpa, length), ctypes.cast(src, ctypes.c_void_p).value, length, 1)
        self.decoder.complete(thread, fault)
        self.kinds[fault.kind] = self.kinds.get(fault.kind, 0) + 1
        return True


def _boot_image(write: bool) -> tuple[bytes, int]:
    program, params = workloads.plan("touch", MEM, 1, 1, write=write)
    m = Machine.create(MachineConfig(MEM, 1))
    m.boot(program, params)
    image = m.memory.read(0, MEM)
    m.close()
    return image, params[0].npages


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_real_exits_on_missing_data_and_code_pages_are_resolved(write: bool) -> None:
    """On this host a data access to a missing page is an MMIO exit and a fetch an emulation
    failure; both are resolved on the vCPU thread and the guest finishes with the right data."""
    image, npages = _boot_image(write)
    program, params = workloads.plan("touch", MEM, 1, 1, write=write)
    uffd = Uffd(UFFD_FEATURE_SIGBUS)
    memory = GuestMemory.create(MEM)
    uffd.register(memory.regions[0].hva, MEM)
    # Everything below DATA_GPA but the code page goes in; the code page and all data do not.
    for gpa in range(0, DATA_GPA, PAGE_SIZE):
        if gpa != CODE_GPA:
            uffd.copy(memory.hva(gpa, PAGE_SIZE), ctypes.cast(image[gpa:gpa + PAGE_SIZE], ctypes.c_void_p).value, PAGE_SIZE)
    m = Machine.create(MachineConfig(MEM, 1), memory=memory)
    try:
        boot = Machine.create(MachineConfig(MEM, 1))
        boot.boot(program, params)
        from vmm import state
        vcpus, vm_state, devices = state.capture(boot)
        boot.close()
        state.restore(m, vcpus, vm_state, devices)
        resolver = _ImageResolver(uffd, memory, image)
        m.vcpus[0].fault_handler = resolver
        m.start()
        assert m.services.wait_for(lambda: m.services.progress[0].done_pages >= 0, 20), m.failures()
        m.pause()
        assert m.services.progress[0].done_pages == npages
        assert resolver.kinds.get(FaultKind.FETCH, 0) >= 1
        assert resolver.kinds.get(FaultKind.MMIO, 0) >= npages
        first = params[0].data_gpa
        if write:  # the emulated writes were completed into RAM: each page holds its own gpa
            for gpa in (first, first + 17 * PAGE_SIZE, first + (npages - 1) * PAGE_SIZE):
                assert int.from_bytes(memory.read(gpa, 8), "little") == gpa
    finally:
        m.close()
        uffd.close()
