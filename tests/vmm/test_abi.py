"""The ctypes kernel ABI: ioctl numbers and struct layouts against the kernel's own values.

Expected numbers are the ones the kernel headers produce (checked against linux/kvm.h and
linux/userfaultfd.h on x86-64), written out literally so a wrong size or direction shows up.
"""
from __future__ import annotations

import ctypes

import pytest

from vmm.abi import ioctl
from vmm.abi import kvm
from vmm.abi import userfaultfd as uffd

KVM_IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_SET_PIT2": 0x4070AEA0,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_TRANSLATE": 0xC018AE85,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_GET_XSAVE2": 0x9000AECF,
}

UFFD_IOCTLS = {
    "USERFAULTFD_IOC_NEW": 0xAA00,
    "UFFDIO_API": 0xC018AA3F,
    "UFFDIO_REGISTER": 0xC020AA00,
    "UFFDIO_UNREGISTER": 0x8010AA01,
    "UFFDIO_WAKE": 0x8010AA02,
    "UFFDIO_COPY": 0xC028AA03,
    "UFFDIO_ZEROPAGE": 0xC020AA04,
}

KVM_STRUCT_SIZES = {
    "kvm_regs": 144, "kvm_segment": 24, "kvm_dtable": 16, "kvm_sregs": 312, "kvm_fpu": 416,
    "kvm_xsave": 4096, "kvm_xcr": 16, "kvm_xcrs": 392, "kvm_lapic_state": 1024, "kvm_vcpu_events": 64,
    "kvm_mp_state": 4, "kvm_debugregs": 128, "kvm_msr_entry": 16, "kvm_msrs": 8, "kvm_msr_list": 4,
    "kvm_cpuid_entry2": 40, "kvm_cpuid2": 8, "kvm_userspace_memory_region": 32, "kvm_dirty_log": 16,
    "kvm_translation": 24, "kvm_clock_data": 48, "kvm_irqchip": 520, "kvm_pit_config": 64,
    "kvm_pit_channel_state": 24, "kvm_pit_state2": 112, "kvm_enable_cap": 104,
}

UFFD_STRUCT_SIZES = {
    "uffdio_api": 24, "uffdio_range": 16, "uffdio_register": 32, "uffdio_copy": 40,
    "uffdio_zeropage": 32, "uffd_msg": 32,
}


@pytest.mark.parametrize("name,number", sorted(KVM_IOCTLS.items()))
def test_kvm_ioctl_number_matches_kernel(name: str, number: int) -> None:
    assert getattr(kvm, name) == number, f"{name} is {getattr(kvm, name):#x}, the kernel's is {number:#x}"


@pytest.mark.parametrize("name,number", sorted(UFFD_IOCTLS.items()))
def test_userfaultfd_ioctl_number_matches_kernel(name: str, number: int) -> None:
    assert getattr(uffd, name) == number, f"{name} is {getattr(uffd, name):#x}, the kernel's is {number:#x}"


@pytest.mark.parametrize("name,size", sorted(KVM_STRUCT_SIZES.items()))
def test_kvm_struct_size_matches_kernel(name: str, size: int) -> None:
    assert ctypes.sizeof(getattr(kvm, name)) == size


@pytest.mark.parametrize("name,size", sorted(UFFD_STRUCT_SIZES.items()))
def test_userfaultfd_struct_size_matches_kernel(name: str, size: int) -> None:
    assert ctypes.sizeof(getattr(uffd, name)) == size


def test_ioc_encoding_puts_direction_size_type_and_number_in_their_bits() -> None:
    assert ioctl._IO(0xAE, 0x80) == 0xAE80
    assert ioctl._IOR(0xAE, 0x81, 0x90) == (2 << 30) | (0x90 << 16) | (0xAE << 8) | 0x81
    assert ioctl._IOW(0xAE, 0x82, 0x90) == (1 << 30) | (0x90 << 16) | (0xAE << 8) | 0x82
    assert ioctl._IOWR(0xAA, 0x03, uffd.uffdio_copy) == (3 << 30) | (40 << 16) | (0xAA << 8) | 0x03


def test_kvm_run_fields_sit_at_kernel_offsets() -> None:
    assert kvm.kvm_run.immediate_exit.offset == 1
    assert kvm.kvm_run.exit_reason.offset == 8
    assert kvm.kvm_run.if_flag.offset == 13
    assert kvm.kvm_run.cr8.offset == 16
    assert kvm.kvm_run.apic_base.offset == 24
    assert kvm.kvm_run.exit.offset == 32
    assert kvm.kvm_run.kvm_valid_regs.offset == 288
    assert kvm.kvm_run_io.data_offset.offset == 8
    assert kvm.kvm_run_mmio.data.offset == 8 and kvm.kvm_run_mmio.len.offset == 16
    assert kvm.kvm_run_mmio.is_write.offset == 20
    assert kvm.kvm_run_internal.data.offset == 8
    assert kvm.kvm_run_memory_fault.gpa.offset == 8


def test_kvm_run_union_members_alias_the_same_bytes() -> None:
    run = kvm.kvm_run()
    run.mmio.phys_addr = 0x1234_5000
    assert run.memory_fault.flags == 0x1234_5000  # both start at the union's first byte
    run.io.port = 0x3F8
    assert ctypes.string_at(ctypes.addressof(run) + 32 + 2, 2) == (0x3F8).to_bytes(2, "little")


def test_nested_struct_fields_sit_at_kernel_offsets() -> None:
    assert kvm.kvm_sregs.gdt.offset == 192 and kvm.kvm_sregs.cr0.offset == 224
    assert kvm.kvm_sregs.efer.offset == 264 and kvm.kvm_sregs.interrupt_bitmap.offset == 280
    assert kvm.kvm_vcpu_events.sipi_vector.offset == 16 and kvm.kvm_vcpu_events.smi.offset == 24
    assert kvm.kvm_vcpu_events.exception_has_payload.offset == 55
    assert kvm.kvm_vcpu_events.exception_payload.offset == 56
    assert kvm.kvm_fpu.last_ip.offset == 136 and kvm.kvm_fpu.xmm.offset == 152 and kvm.kvm_fpu.mxcsr.offset == 416 - 8
    assert kvm.kvm_debugregs.dr7.offset == 40
    assert kvm.kvm_pit_channel_state.count_load_time.offset == 16
    assert uffd.uffd_msg.arg.offset == 8
    assert uffd.uffd_msg_pagefault.address.offset == 8
    assert uffd.uffdio_copy.copy.offset == 32 and uffd.uffdio_zeropage.zeropage.offset == 24


def test_exit_reasons_and_uffd_constants_have_kernel_values() -> None:
    assert (kvm.KVM_EXIT_IO, kvm.KVM_EXIT_HLT, kvm.KVM_EXIT_MMIO, kvm.KVM_EXIT_SHUTDOWN) == (2, 5, 6, 8)
    assert (kvm.KVM_EXIT_INTR, kvm.KVM_EXIT_INTERNAL_ERROR, kvm.KVM_EXIT_MEMORY_FAULT) == (10, 17, 39)
    assert kvm.KVM_EXIT_NAMES[kvm.KVM_EXIT_MMIO] == "KVM_EXIT_MMIO"
    assert uffd.UFFD_EVENT_PAGEFAULT == 0x12
    assert uffd.UFFD_FEATURE_SIGBUS == 0x80 and uffd.UFFD_FEATURE_MOVE == 1 << 16
    assert uffd.UFFD_FEATURE_NAMES[uffd.UFFD_FEATURE_SIGBUS] == "UFFD_FEATURE_SIGBUS"
    assert kvm.KVM_CAP_XSAVE2 == 208 and kvm.KVM_CAP_MEMORY_FAULT_INFO == 232
