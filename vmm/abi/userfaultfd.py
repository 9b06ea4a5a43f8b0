"""userfaultfd ABI from include/uapi/linux/userfaultfd.h."""
from __future__ import annotations

import ctypes
from ctypes import c_int64 as s64
from ctypes import c_uint8 as u8
from ctypes import c_uint16 as u16
from ctypes import c_uint32 as u32
from ctypes import c_uint64 as u64

from vmm.abi.ioctl import _IO, _IOR, _IOWR

UFFD_API = 0xAA
UFFDIO = 0xAA

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16
UFFD_FEATURE_NAMES = {v: k for k, v in globals().items() if k.startswith("UFFD_FEATURE_")}

UFFD_USER_MODE_ONLY = 1  # flag of USERFAULTFD_IOC_NEW; never set: KVM faults in kernel mode

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", u64), ("features", u64), ("ioctls", u64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", u64), ("len", u64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("ioctls", u64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", u64), ("src", u64), ("len", u64), ("mode", u64), ("copy", s64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("zeropage", s64)]


class uffd_msg_pagefault(ctypes.Structure):
    _fields_ = [("flags", u64), ("address", u64), ("ptid", u32), ("pad", u32)]


class uffd_msg_arg(ctypes.Union):
    _fields_ = [("pagefault", uffd_msg_pagefault), ("reserved", u64 * 3)]


class uffd_msg(ctypes.Structure):
    _fields_ = [("event", u8), ("reserved1", u8), ("reserved2", u16), ("reserved3", u32), ("arg", uffd_msg_arg)]


USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)
UFFDIO_API = _IOWR(UFFDIO, 0x3F, uffdio_api)
UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, uffdio_register)
UFFDIO_UNREGISTER = _IOR(UFFDIO, 0x01, uffdio_range)
UFFDIO_WAKE = _IOR(UFFDIO, 0x02, uffdio_range)
UFFDIO_COPY = _IOWR(UFFDIO, 0x03, uffdio_copy)
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, 0x04, uffdio_zeropage)

assert ctypes.sizeof(uffd_msg) == 32 and ctypes.sizeof(uffdio_copy) == 40
assert UFFDIO_API == 0xC018AA3F and UFFDIO_COPY == 0xC028AA03 and UFFDIO_REGISTER == 0xC020AA00
