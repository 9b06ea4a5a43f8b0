"""Kvm, Vm and Vcpu: each owns its file descriptor and offers the KVM ioctls as methods named
after them, in the manner of rust-vmm's kvm-ioctls. Nothing here knows about guests or devices."""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from typing import TypeVar

from vmm import libc
from vmm.abi import kvm as abi

T = TypeVar("T", bound=ctypes.Structure)
KVM_DEVICE = "/dev/kvm"
MAX_CPUID_ENTRIES = 256


class KvmError(Exception):
    """A KVM ioctl or the KVM device failed. ``errno`` is the kernel's error number, if any."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err


def _ioctl(fd: int, request: int, arg: object, what: str) -> int:
    return libc.checked_ioctl(fd, request, arg, what, KvmError)


class Kvm:
    """The /dev/kvm system fd."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"cannot open {path}: {e.strerror} (KVM is required; "
                           "is this a Linux host with /dev/kvm and are you root or in group kvm?)", e.errno) from None
        version = self.get_api_version()
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(f"{path} speaks KVM API {version}, this VMM needs {abi.KVM_API_VERSION}")

    def get_api_version(self) -> int:
        return _ioctl(self.fd, abi.KVM_GET_API_VERSION, None, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap, f"KVM_CHECK_EXTENSION({cap})")

    def get_vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, None, "KVM_GET_VCPU_MMAP_SIZE")

    def get_supported_cpuid(self) -> bytes:
        """struct kvm_cpuid2 with its entries, as raw bytes ready for KVM_SET_CPUID2."""
        buf = _cpuid_buffer(MAX_CPUID_ENTRIES)
        _ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
        return _cpuid_bytes(buf)

    def get_msr_index_list(self) -> list[int]:
        n = 512
        buf = ctypes.create_string_buffer(ctypes.sizeof(abi.kvm_msr_list) + 4 * n)
        abi.kvm_msr_list.from_buffer(buf).nmsrs = n
        _ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
        count = abi.kvm_msr_list.from_buffer(buf).nmsrs
        return list((ctypes.c_uint32 * count).from_buffer(buf, ctypes.sizeof(abi.kvm_msr_list)))

    def create_vm(self) -> Vm:
        return Vm(self, _ioctl(self.fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _cpuid_buffer(nent: int) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(ctypes.sizeof(abi.kvm_cpuid2) + nent * ctypes.sizeof(abi.kvm_cpuid_entry2))
    abi.kvm_cpuid2.from_buffer(buf).nent = nent
    return buf


def _cpuid_bytes(buf: ctypes.Array[ctypes.c_char]) -> bytes:
    nent = abi.kvm_cpuid2.from_buffer(buf).nent
    return buf.raw[: ctypes.sizeof(abi.kvm_cpuid2) + nent * ctypes.sizeof(abi.kvm_cpuid_entry2)]


class Vm:
    """A VM fd: memslots, the in-kernel irqchip and PIT, the VM clock, vCPU creation."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int,
                               flags: int = 0) -> None:
        region = abi.kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, ctypes.byref(region),
               f"KVM_SET_USER_MEMORY_REGION(slot {slot}, gpa {guest_phys_addr:#x}, size {memory_size:#x})")

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array[ctypes.c_char]) -> None:
        log = abi.kvm_dirty_log(slot, 0, ctypes.addressof(bitmap))
        _ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, ctypes.byref(log), f"KVM_GET_DIRTY_LOG(slot {slot})")

    def create_irqchip(self) -> None:
        _ioctl(self.fd, abi.KVM_CREATE_IRQCHIP, None, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        config = abi.kvm_pit_config(flags=abi.KVM_PIT_SPEAKER_DUMMY)
        _ioctl(self.fd, abi.KVM_CREATE_PIT2, ctypes.byref(config), "KVM_CREATE_PIT2")

    def get_clock(self) -> abi.kvm_clock_data:
        return self._get(abi.KVM_GET_CLOCK, abi.kvm_clock_data(), "KVM_GET_CLOCK")

    def set_clock(self, clock: abi.kvm_clock_data) -> None:
        _ioctl(self.fd, abi.KVM_SET_CLOCK, ctypes.byref(clock), "KVM_SET_CLOCK")

    def get_irqchip(self, chip_id: int) -> abi.kvm_irqchip:
        return self._get(abi.KVM_GET_IRQCHIP, abi.kvm_irqchip(chip_id=chip_id), f"KVM_GET_IRQCHIP({chip_id})")

    def set_irqchip(self, chip: abi.kvm_irqchip) -> None:
        _ioctl(self.fd, abi.KVM_SET_IRQCHIP, ctypes.byref(chip), f"KVM_SET_IRQCHIP({chip.chip_id})")

    def get_pit2(self) -> abi.kvm_pit_state2:
        return self._get(abi.KVM_GET_PIT2, abi.kvm_pit_state2(), "KVM_GET_PIT2")

    def set_pit2(self, pit: abi.kvm_pit_state2) -> None:
        _ioctl(self.fd, abi.KVM_SET_PIT2, ctypes.byref(pit), "KVM_SET_PIT2")

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = _ioctl(self.fd, abi.KVM_CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU({vcpu_id})")
        return Vcpu(self, vcpu_id, fd)

    def _get(self, request: int, value: T, what: str) -> T:
        _ioctl(self.fd, request, ctypes.byref(value), what)
        return value

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# struct kvm_run's fields the fault path reads, as indexes into Vcpu.run_u8/u32/u64.
_MMIO = abi.kvm_run.mmio.offset
EXIT_REASON_U32 = abi.kvm_run.exit_reason.offset // 4
MMIO_PHYS_ADDR_U64 = (_MMIO + abi.kvm_run_mmio.phys_addr.offset) // 8
MMIO_DATA_OFFSET = _MMIO + abi.kvm_run_mmio.data.offset
MMIO_DATA_U64 = MMIO_DATA_OFFSET // 8
MMIO_LEN_U32 = (_MMIO + abi.kvm_run_mmio.len.offset) // 4
MMIO_IS_WRITE_U8 = _MMIO + abi.kvm_run_mmio.is_write.offset


class Vcpu:
    """A vCPU fd and its mmap'ed struct kvm_run."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._run_map = mmap.mmap(fd, vm.kvm.get_vcpu_mmap_size(), mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = abi.kvm_run.from_buffer(self._run_map)
        self.run_address = ctypes.addressof(self.run_struct)
        # The same page as bytes, u32s and u64s: the fault path reads exit_reason and the mmio
        # fields by index, several times cheaper than through the ctypes structure.
        self.run_u8 = memoryview(self._run_map)
        self.run_u32 = self.run_u8.cast("I")
        self.run_u64 = self.run_u8.cast("Q")
        xsave_size = vm.kvm.check_extension(abi.KVM_CAP_XSAVE2)
        self._xsave_size = max(xsave_size, ctypes.sizeof(abi.kvm_xsave))

    def run(self) -> int:
        """KVM_RUN; returns 0, or -errno (EINTR when kicked, EFAULT for a memory fault).
        fcntl.ioctl with no argument is the cheapest call into the kernel Python has (a third of
        a ctypes call) and releases the GIL while the guest runs."""
        try:
            fcntl.ioctl(self.fd, abi.KVM_RUN)
        except OSError as e:
            return -e.errno
        return 0

    def run_data(self, offset: int, length: int) -> ctypes.Array[ctypes.c_char]:
        """A view of `length` bytes of the kvm_run page at `offset` (port I/O data lives there)."""
        return (ctypes.c_char * length).from_address(self.run_address + offset)

    def _get(self, request: int, value: T, what: str) -> T:
        _ioctl(self.fd, request, ctypes.byref(value), f"{what} on vCPU {self.id}")
        return value

    def _set(self, request: int, value: ctypes.Structure, what: str) -> None:
        _ioctl(self.fd, request, ctypes.byref(value), f"{what} on vCPU {self.id}")

    def get_regs(self) -> abi.kvm_regs:
        return self._get(abi.KVM_GET_REGS, abi.kvm_regs(), "KVM_GET_REGS")

    def set_regs(self, regs: abi.kvm_regs) -> None:
        self._set(abi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> abi.kvm_sregs:
        return self._get(abi.KVM_GET_SREGS, abi.kvm_sregs(), "KVM_GET_SREGS")

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        self._set(abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> abi.kvm_fpu:
        return self._get(abi.KVM_GET_FPU, abi.kvm_fpu(), "KVM_GET_FPU")

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        self._set(abi.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_xsave(self) -> bytes:
        buf = ctypes.create_string_buffer(self._xsave_size)
        request = abi.KVM_GET_XSAVE2 if self._xsave_size > ctypes.sizeof(abi.kvm_xsave) else abi.KVM_GET_XSAVE
        _ioctl(self.fd, request, buf, f"KVM_GET_XSAVE on vCPU {self.id}")
        return buf.raw

    def set_xsave(self, xsave: bytes) -> None:
        if len(xsave) != self._xsave_size:
            raise KvmError(f"KVM_SET_XSAVE on vCPU {self.id}: {len(xsave)} bytes, this host's xsave is {self._xsave_size}")
        buf = ctypes.create_string_buffer(xsave, len(xsave))
        _ioctl(self.fd, abi.KVM_SET_XSAVE, buf, f"KVM_SET_XSAVE on vCPU {self.id}")

    def get_xcrs(self) -> abi.kvm_xcrs:
        return self._get(abi.KVM_GET_XCRS, abi.kvm_xcrs(), "KVM_GET_XCRS")

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        self._set(abi.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def get_lapic(self) -> abi.kvm_lapic_state:
        return self._get(abi.KVM_GET_LAPIC, abi.kvm_lapic_state(), "KVM_GET_LAPIC")

    def set_lapic(self, lapic: abi.kvm_lapic_state) -> None:
        self._set(abi.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        return self._get(abi.KVM_GET_VCPU_EVENTS, abi.kvm_vcpu_events(), "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        self._set(abi.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def get_mp_state(self) -> abi.kvm_mp_state:
        return self._get(abi.KVM_GET_MP_STATE, abi.kvm_mp_state(), "KVM_GET_MP_STATE")

    def set_mp_state(self, mp_state: abi.kvm_mp_state) -> None:
        self._set(abi.KVM_SET_MP_STATE, mp_state, "KVM_SET_MP_STATE")

    def get_debugregs(self) -> abi.kvm_debugregs:
        return self._get(abi.KVM_GET_DEBUGREGS, abi.kvm_debugregs(), "KVM_GET_DEBUGREGS")

    def set_debugregs(self, debugregs: abi.kvm_debugregs) -> None:
        self._set(abi.KVM_SET_DEBUGREGS, debugregs, "KVM_SET_DEBUGREGS")

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        buf = _msrs_buffer([(i, 0) for i in indices])
        got = _ioctl(self.fd, abi.KVM_GET_MSRS, buf, f"KVM_GET_MSRS on vCPU {self.id}")
        if got != len(indices):  # a silently shortened list would lose state in a migration
            raise KvmError(f"KVM_GET_MSRS on vCPU {self.id}: MSR {indices[got]:#x} was refused")
        entries = (abi.kvm_msr_entry * len(indices)).from_buffer(buf, ctypes.sizeof(abi.kvm_msrs))
        return [(e.index, e.data) for e in entries]

    def set_msrs(self, msrs: list[tuple[int, int]]) -> None:
        done = _ioctl(self.fd, abi.KVM_SET_MSRS, _msrs_buffer(msrs), f"KVM_SET_MSRS on vCPU {self.id}")
        if done != len(msrs):
            raise KvmError(f"KVM_SET_MSRS on vCPU {self.id}: MSR {msrs[done][0]:#x} was refused")

    def set_cpuid2(self, cpuid: bytes) -> None:
        buf = ctypes.create_string_buffer(cpuid, len(cpuid))
        _ioctl(self.fd, abi.KVM_SET_CPUID2, buf, f"KVM_SET_CPUID2 on vCPU {self.id}")

    def get_cpuid2(self) -> bytes:
        buf = _cpuid_buffer(MAX_CPUID_ENTRIES)
        _ioctl(self.fd, abi.KVM_GET_CPUID2, buf, f"KVM_GET_CPUID2 on vCPU {self.id}")
        return _cpuid_bytes(buf)

    def translate(self, linear_address: int) -> abi.kvm_translation:
        tr = abi.kvm_translation(linear_address=linear_address)
        _ioctl(self.fd, abi.KVM_TRANSLATE, ctypes.byref(tr), f"KVM_TRANSLATE({linear_address:#x}) on vCPU {self.id}")
        return tr

    def close(self) -> None:
        if self.fd >= 0:
            del self.run_struct
            for view in (self.run_u64, self.run_u32, self.run_u8):
                view.release()
            try:
                self._run_map.close()
            except BufferError:
                pass  # a traceback still holds a view of kvm_run: it is unmapped when that goes
            os.close(self.fd)
            self.fd = -1


def _msrs_buffer(msrs: list[tuple[int, int]]) -> ctypes.Array[ctypes.c_char]:
    head = ctypes.sizeof(abi.kvm_msrs)
    buf = ctypes.create_string_buffer(head + len(msrs) * ctypes.sizeof(abi.kvm_msr_entry))
    abi.kvm_msrs.from_buffer(buf).nmsrs = len(msrs)
    entries = (abi.kvm_msr_entry * len(msrs)).from_buffer(buf, head)
    for entry, (index, data) in zip(entries, msrs):
        entry.index, entry.data = index, data
    return buf
