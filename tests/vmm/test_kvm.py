"""vmm.kvm against the real /dev/kvm: the system, VM and vCPU ioctls and their errors."""
from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Iterator

import pytest

from vmm import libc
from vmm.abi import kvm as abi
from vmm.guest import workloads
from vmm.guest.layout import CODE_GPA, DATA_GPA
from vmm.guest.services import GS_DONE, GS_PORT
from vmm.kvm import Kvm, KvmError, Vcpu, Vm
from vmm.machine import Machine, MachineConfig

pytestmark = pytest.mark.usefixtures("kvm_available")

MSR_LSTAR = 0xC0000082
MSR_IA32_SYSENTER_CS = 0x174
APIC_TPR = 0x80
APIC_SPIV = 0xF0
XCR0_X87, XCR0_SSE = 1 << 0, 1 << 1
KVM_MP_STATE_HALTED = 3
CPUID_EXT_FEATURES = 0x80000001
CPUID_EDX_LM = 1 << 29
GUEST_BYTES = 16 << 20
XSAVE_MXCSR, XSAVE_XMM0, XSAVE_XSTATE_BV = 24, 160, 512  # offsets in the XSAVE area (SDM 13.4)


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    k = Kvm()
    yield k
    k.close()


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    v = kvm.create_vm()
    yield v
    v.close()


@pytest.fixture
def vcpu(kvm: Kvm, vm: Vm) -> Iterator[Vcpu]:
    """vCPU 0 as Machine makes it: irqchip first (LAPIC state needs it), the host's CPUID set
    (without it KVM keeps only x87 state: SSE registers and MXCSR would not round-trip)."""
    vm.create_irqchip()
    c = vm.create_vcpu(0)
    c.set_cpuid2(kvm.get_supported_cpuid())
    yield c
    c.close()


@pytest.fixture
def booted() -> Iterator[Machine]:
    """A 16 MiB machine with the touch workload booted (page tables, sregs) but not started."""
    program, params = workloads.plan("touch", GUEST_BYTES, 1, seed=1)
    m = Machine.create(MachineConfig(GUEST_BYTES, 1))
    m.boot(program, params)
    yield m
    m.close()


def _cpuid_entries(blob: bytes) -> list[abi.kvm_cpuid_entry2]:
    head = abi.kvm_cpuid2.from_buffer_copy(blob[: ctypes.sizeof(abi.kvm_cpuid2)])
    return list((abi.kvm_cpuid_entry2 * head.nent).from_buffer_copy(blob, ctypes.sizeof(abi.kvm_cpuid2)))


# -- the system fd ----------------------------------------------------------------------------

def test_api_version_is_12(kvm: Kvm) -> None:
    assert kvm.get_api_version() == abi.KVM_API_VERSION == 12


def test_check_extension_reports_present_caps_and_zero_for_unknown(kvm: Kvm) -> None:
    assert kvm.check_extension(abi.KVM_CAP_USER_MEMORY) > 0
    assert kvm.check_extension(abi.KVM_CAP_IRQCHIP) > 0
    assert kvm.check_extension(abi.KVM_CAP_IMMEDIATE_EXIT) > 0
    assert kvm.check_extension(abi.KVM_CAP_NR_MEMSLOTS) >= 1
    assert kvm.check_extension(0xFFFF) == 0


def test_supported_cpuid_is_nonempty_and_offers_long_mode(kvm: Kvm) -> None:
    blob = kvm.get_supported_cpuid()
    entries = _cpuid_entries(blob)
    assert entries, "KVM_GET_SUPPORTED_CPUID returned no entries"
    assert len(blob) == ctypes.sizeof(abi.kvm_cpuid2) + len(entries) * ctypes.sizeof(abi.kvm_cpuid_entry2)
    functions = {e.function for e in entries}
    assert 0 in functions and CPUID_EXT_FEATURES in functions
    ext = next(e for e in entries if e.function == CPUID_EXT_FEATURES)
    assert ext.edx & CPUID_EDX_LM, "the host offers no long mode"


def test_msr_index_list_is_nonempty_and_holds_syscall_msrs(kvm: Kvm) -> None:
    indices = kvm.get_msr_index_list()
    assert len(indices) > 10
    assert len(set(indices)) == len(indices)
    assert MSR_LSTAR in indices and MSR_IA32_SYSENTER_CS in indices


def test_opening_a_missing_device_raises_kvm_error_naming_it() -> None:
    with pytest.raises(KvmError, match="/nonexistent/kvm") as info:
        Kvm("/nonexistent/kvm")
    assert info.value.errno == errno.ENOENT


# -- VM and vCPU creation ---------------------------------------------------------------------

def test_create_vm_and_vcpu_give_fds_and_a_mapped_kvm_run(kvm: Kvm, vm: Vm, vcpu: Vcpu) -> None:
    assert vm.fd >= 0 and vcpu.fd >= 0 and vcpu.fd != vm.fd
    assert kvm.get_vcpu_mmap_size() >= ctypes.sizeof(abi.kvm_run)
    assert vcpu.id == 0
    assert vcpu.run_struct.immediate_exit == 0
    assert ctypes.addressof(vcpu.run_struct) == vcpu.run_address


def test_creating_the_same_vcpu_id_twice_raises_kvm_error(vm: Vm, vcpu: Vcpu) -> None:
    with pytest.raises(KvmError, match="KVM_CREATE_VCPU") as info:
        vm.create_vcpu(0)
    assert info.value.errno == errno.EEXIST


def test_unaligned_memslot_size_raises_kvm_error_naming_the_ioctl(vm: Vm) -> None:
    size = 2 * 4096
    hva = libc.mmap(None, size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS, -1, 0)
    assert hva not in (None, libc.MAP_FAILED)
    try:
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(0, 0, 4097, hva)
        assert "KVM_SET_USER_MEMORY_REGION" in str(info.value)
        assert "0x1001" in str(info.value)  # the message names the bad size
        assert info.value.errno == errno.EINVAL
        vm.set_user_memory_region(0, 0, size, hva)  # the aligned one is accepted
    finally:
        libc.munmap(hva, size)


# -- state getters and setters on a fresh vCPU --------------------------------------------------

def test_regs_round_trip(vcpu: Vcpu) -> None:
    regs = vcpu.get_regs()
    regs.rax, regs.rbx, regs.r15, regs.rip, regs.rsp = 0x1122334455667788, 0xAB, 0xCAFE, 0x40000, 0x21000
    regs.rflags = 0x2
    vcpu.set_regs(regs)
    got = vcpu.get_regs()
    assert (got.rax, got.rbx, got.r15, got.rip, got.rsp, got.rflags) == (
        0x1122334455667788, 0xAB, 0xCAFE, 0x40000, 0x21000, 0x2)
    assert bytes(got) == bytes(regs)


def test_sregs_round_trip(vcpu: Vcpu) -> None:
    sregs = vcpu.get_sregs()
    sregs.gdt.base, sregs.gdt.limit = 0x13000, 23
    sregs.idt.base, sregs.idt.limit = 0x14000, 4095
    sregs.cr3 = 0x1000
    vcpu.set_sregs(sregs)
    got = vcpu.get_sregs()
    assert (got.gdt.base, got.gdt.limit, got.idt.base, got.idt.limit, got.cr3) == (0x13000, 23, 0x14000, 4095, 0x1000)
    assert bytes(got) == bytes(sregs)


def test_fpu_round_trip(vcpu: Vcpu) -> None:
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x27F
    ctypes.memmove(fpu.xmm[0], bytes(range(1, 17)), 16)
    vcpu.set_fpu(fpu)  # KVM_{GET,SET}_FPU leave MXCSR out: it travels in XSAVE only
    got = vcpu.get_fpu()
    assert got.fcw == 0x27F
    assert bytes(got.xmm[0]) == bytes(range(1, 17))


def test_xsave_round_trip_and_agrees_with_fpu(vcpu: Vcpu) -> None:
    xsave = bytearray(vcpu.get_xsave())
    assert len(xsave) >= ctypes.sizeof(abi.kvm_xsave)
    struct.pack_into("<I", xsave, XSAVE_MXCSR, 0x9F80)  # FZ set: supported wherever SSE2 is
    xsave[XSAVE_XMM0:XSAVE_XMM0 + 16] = bytes(range(0xA0, 0xB0))
    xsave[XSAVE_XSTATE_BV] |= XCR0_SSE  # else KVM loads the SSE state in its init form
    vcpu.set_xsave(bytes(xsave))
    got = vcpu.get_xsave()
    assert got[XSAVE_XMM0:XSAVE_XMM0 + 16] == bytes(range(0xA0, 0xB0))
    assert struct.unpack_from("<I", got, XSAVE_MXCSR)[0] == 0x9F80
    assert bytes(vcpu.get_fpu().xmm[0]) == bytes(range(0xA0, 0xB0))


def test_set_xsave_of_the_wrong_size_raises_kvm_error(vcpu: Vcpu) -> None:
    with pytest.raises(KvmError, match="KVM_SET_XSAVE"):
        vcpu.set_xsave(b"\0" * 100)


def test_xcrs_round_trip(vcpu: Vcpu) -> None:
    xcrs = vcpu.get_xcrs()
    assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].xcr == 0 and xcrs.xcrs[0].value & XCR0_X87
    xcrs.xcrs[0].value = XCR0_X87 | XCR0_SSE
    vcpu.set_xcrs(xcrs)
    got = vcpu.get_xcrs()
    assert got.xcrs[0].value == XCR0_X87 | XCR0_SSE


def test_lapic_round_trip_after_irqchip(vcpu: Vcpu) -> None:
    regs = bytearray(bytes(vcpu.get_lapic()))
    assert len(regs) == abi.KVM_APIC_REG_SIZE
    struct.pack_into("<I", regs, APIC_TPR, 0x20)
    struct.pack_into("<I", regs, APIC_SPIV, 0x1FF)  # software-enabled, spurious vector 0xFF
    vcpu.set_lapic(abi.kvm_lapic_state.from_buffer_copy(regs))
    got = bytes(vcpu.get_lapic())
    assert struct.unpack_from("<I", got, APIC_TPR)[0] == 0x20
    assert struct.unpack_from("<I", got, APIC_SPIV)[0] == 0x1FF


def test_vcpu_events_round_trip(vcpu: Vcpu) -> None:
    events = vcpu.get_vcpu_events()
    vcpu.set_vcpu_events(events)
    assert bytes(vcpu.get_vcpu_events()) == bytes(events)
    events.nmi.masked = 1
    vcpu.set_vcpu_events(events)
    assert vcpu.get_vcpu_events().nmi.masked == 1


def test_mp_state_round_trip(vcpu: Vcpu) -> None:
    assert vcpu.get_mp_state().mp_state == abi.KVM_MP_STATE_RUNNABLE  # vCPU 0 is the BSP
    vcpu.set_mp_state(abi.kvm_mp_state(KVM_MP_STATE_HALTED))
    assert vcpu.get_mp_state().mp_state == KVM_MP_STATE_HALTED
    vcpu.set_mp_state(abi.kvm_mp_state(abi.KVM_MP_STATE_RUNNABLE))
    assert vcpu.get_mp_state().mp_state == abi.KVM_MP_STATE_RUNNABLE


def test_debugregs_round_trip(vcpu: Vcpu) -> None:
    dr = vcpu.get_debugregs()
    for i, addr in enumerate((0x1000, 0x2000, 0x3000, 0x4000)):
        dr.db[i] = addr
    vcpu.set_debugregs(dr)
    got = vcpu.get_debugregs()
    assert list(got.db) == [0x1000, 0x2000, 0x3000, 0x4000]
    assert got.dr7 == dr.dr7 and got.dr6 == dr.dr6


def test_every_listed_msr_reads_and_writes_back(kvm: Kvm, vcpu: Vcpu) -> None:
    indices = kvm.get_msr_index_list()
    msrs = vcpu.get_msrs(indices)
    assert [i for i, _ in msrs] == indices, "KVM_GET_MSRS stopped before the end of the index list"
    vcpu.set_msrs(msrs)
    vcpu.set_msrs([(MSR_LSTAR, 0xFFFFFFFF81000000)])
    assert vcpu.get_msrs([MSR_LSTAR]) == [(MSR_LSTAR, 0xFFFFFFFF81000000)]


def test_set_msrs_of_an_unknown_msr_raises_kvm_error_naming_it(vcpu: Vcpu) -> None:
    with pytest.raises(KvmError, match="0xdead0000"):
        vcpu.set_msrs([(0xDEAD0000, 1)])


def _regs(e: abi.kvm_cpuid_entry2) -> tuple[int, int, int, int]:
    return e.eax, e.ebx, e.ecx, e.edx


def test_cpuid2_set_then_get_keeps_the_supported_leaves(kvm: Kvm, vcpu: Vcpu) -> None:
    supported = kvm.get_supported_cpuid()
    vcpu.set_cpuid2(supported)
    got = [(e.function, e.index) for e in _cpuid_entries(vcpu.get_cpuid2())]
    want = {(e.function, e.index): _regs(e) for e in _cpuid_entries(supported)}
    assert got == [k for k in want if k in got], "KVM_GET_CPUID2 added or reordered entries"
    # Linux 6.18 on Intel (a 16-CPU host) kept neither of the all-zero AMX leaves 0x1d and 0x1e
    # that it lists as supported: a guest reads zeros for them either way. (The registers are
    # not compared: this host's KVM returns many more feature bits in leaves 1 and 7 than its
    # KVM_GET_SUPPORTED_CPUID listed.)
    assert all(regs == (0, 0, 0, 0) for k, regs in want.items() if k not in got), "KVM_SET_CPUID2 lost entries"


def test_cpuid2_from_get_sets_again_unchanged(vcpu: Vcpu) -> None:
    """What a migration does: the source's KVM_GET_CPUID2, set on the destination's vCPU."""
    saved = vcpu.get_cpuid2()
    vcpu.set_cpuid2(saved)
    assert vcpu.get_cpuid2() == saved


# -- a booted guest ---------------------------------------------------------------------------

def test_translate_on_a_booted_guest_follows_its_identity_map(booted: Machine) -> None:
    vcpu = booted.vcpus[0].vcpu
    for linear in (CODE_GPA, DATA_GPA + 0x123, GUEST_BYTES - 8):
        tr = vcpu.translate(linear)
        assert tr.valid == 1 and tr.physical_address == linear, f"{linear:#x} -> {tr.physical_address:#x}"
        assert tr.writeable == 1
    assert vcpu.translate(GUEST_BYTES + (2 << 20)).valid == 0  # past the last mapped 2 MiB page


def test_kvm_run_exits_to_userspace_at_the_guests_port_write(booted: Machine) -> None:
    vcpu = booted.vcpus[0].vcpu
    assert vcpu.run() == 0
    run = vcpu.run_struct
    assert run.exit_reason == abi.KVM_EXIT_IO
    assert (run.io.direction, run.io.port, run.io.size) == (abi.KVM_EXIT_IO_OUT, GS_PORT, 4)
    assert ctypes.c_uint32.from_address(vcpu.run_address + run.io.data_offset).value == GS_DONE
    assert vcpu.get_regs().r8 == (GUEST_BYTES - DATA_GPA) // 4096  # pages the guest touched


def test_kvm_run_with_immediate_exit_returns_eintr_without_entering(booted: Machine) -> None:
    vcpu = booted.vcpus[0].vcpu
    rip = vcpu.get_regs().rip
    vcpu.run_struct.immediate_exit = 1
    assert vcpu.run() == -errno.EINTR
    vcpu.run_struct.immediate_exit = 0
    assert vcpu.get_regs().rip == rip


def test_a_control_ioctl_interrupted_by_a_signal_is_made_again_and_other_errors_are_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """KVM_CREATE_VM fails with EINTR while a profiler is attached: checked_ioctl asks again,
    as Python does for its own system calls; any other error is raised with its name."""
    answers = [(-1, errno.EINTR), (-1, errno.EINTR), (7, 0)]
    calls: list[int] = []

    def fake_ioctl(fd: int, request: int, arg: object) -> int:
        calls.append(request)
        ret, err = answers.pop(0)
        ctypes.set_errno(err)
        return ret

    monkeypatch.setattr(libc, "ioctl", fake_ioctl)
    assert libc.checked_ioctl(3, 0xAE01, 0, "KVM_CREATE_VM", KvmError) == 7 and len(calls) == 3
    answers[:] = [(-1, errno.ENOMEM)]
    with pytest.raises(KvmError, match="KVM_CREATE_VM: Cannot allocate memory .errno ENOMEM."):
        libc.checked_ioctl(3, 0xAE01, 0, "KVM_CREATE_VM", KvmError)
