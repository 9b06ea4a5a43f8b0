"""The protocol version and every size limit of the wire format, each defined once.

Changing what a message carries (a field, a type, a limit that a peer relies on) bumps
PROTOCOL_VERSION; the two sides must speak the same version.
"""

from typing import Final

# 2: one checksum per page batch (was one per page); 3: the zero map left the header for its own message
PROTOCOL_VERSION: Final = 3

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30

PAGE_SIZE: Final = 4096

# One PageRequest asks for at most this many pages, so one PageBatch carries at most 4 MiB.
MAX_BATCH_PAGES: Final = 1024
MAX_BATCH_BYTES: Final = MAX_BATCH_PAGES * PAGE_SIZE
MAX_BATCH_BITMAP_BYTES: Final = (MAX_BATCH_PAGES + 7) // 8

# Guest physical addresses are below 2**52 (the architectural maximum on x86-64).
MAX_GPA: Final = 1 << 52
MAX_GUEST_BYTES: Final = 64 * GiB
MAX_GUEST_PAGES: Final = MAX_GUEST_BYTES // PAGE_SIZE
MAX_ZERO_BITMAP_BYTES: Final = (MAX_GUEST_PAGES + 7) // 8
MAX_REGIONS: Final = 32

MAX_VCPUS: Final = 32
# Each raw kernel struct of a vCPU or of the VM (kvm_regs, kvm_xsave, kvm_cpuid2, ...).
MAX_STATE_BLOB_BYTES: Final = 64 * KiB
# struct kvm_msr_entry: u32 index, u32 reserved, u64 data.
KVM_MSR_ENTRY_SIZE: Final = 16
# KVM has three irqchips (PIC master, PIC slave, IOAPIC); leave room, keep it bounded.
MAX_IRQCHIPS: Final = 8

MAX_DEVICES: Final = 16
MAX_DEVICE_NAME_LEN: Final = 32
MAX_DEVICE_STATE_BYTES: Final = 1 * MiB

# Pages the source pushes inside the header so the guest does not fault on them at once.
MAX_EAGER_RUNS: Final = 4096
MAX_EAGER_BYTES: Final = 64 * MiB

MAX_ID_LEN: Final = 64  # migration_id and boot_id
MAX_WORKLOAD_KEYS: Final = 32
MAX_WORKLOAD_KEY_LEN: Final = 32
MAX_WORKLOAD_STR_LEN: Final = 256
MAX_STATS: Final = 64
MAX_STAT_NAME_LEN: Final = 64
MAX_ERROR_MESSAGE_LEN: Final = 1024  # characters

# Integers on the wire: msgpack carries at most a signed or unsigned 64-bit value.
I64_MIN: Final = -(1 << 63)
I64_MAX: Final = (1 << 63) - 1
U64_MAX: Final = (1 << 64) - 1

# Whole encoded messages. A peer refuses a body above these before decoding (HTTP 413).
MAX_REQUEST_MESSAGE_BYTES: Final = 128
MAX_BATCH_MESSAGE_BYTES: Final = (
    MAX_BATCH_BYTES + MAX_BATCH_BITMAP_BYTES + 256
)
MAX_HEADER_MESSAGE_BYTES: Final = 128 * MiB
MAX_ZERO_MAP_MESSAGE_BYTES: Final = MAX_ZERO_BITMAP_BYTES + 256
MAX_COMPLETE_MESSAGE_BYTES: Final = 16 * KiB
MAX_ERROR_MESSAGE_BYTES: Final = 8 * KiB
