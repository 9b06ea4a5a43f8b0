"""The wire messages between the migration source (page server) and the destination.

Every message is one msgpack map holding "v" (the protocol version), "t" (the message type)
and its fields. Records validate themselves when constructed, so a decoded message is a valid
one; decoders raise only ProtoError, whatever bytes they are given.
"""

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, ClassVar, Final, Literal, NamedTuple, Self, TypeAlias, TypeVar

import msgpack
from xxhash import xxh3_64_intdigest

from proto.checksum import Buffer, pages_sum
from proto.errors import ProtoError
from proto.version import (
    I64_MAX,
    I64_MIN,
    KVM_MSR_ENTRY_SIZE,
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGE_BYTES,
    MAX_BATCH_PAGES,
    MAX_COMPLETE_MESSAGE_BYTES,
    MAX_DEVICE_NAME_LEN,
    MAX_DEVICE_STATE_BYTES,
    MAX_DEVICES,
    MAX_EAGER_BYTES,
    MAX_EAGER_RUNS,
    MAX_ERROR_MESSAGE_BYTES,
    MAX_ERROR_MESSAGE_LEN,
    MAX_GPA,
    MAX_GUEST_BYTES,
    MAX_HEADER_MESSAGE_BYTES,
    MAX_ID_LEN,
    MAX_IRQCHIPS,
    MAX_REGIONS,
    MAX_REQUEST_MESSAGE_BYTES,
    MAX_STAT_NAME_LEN,
    MAX_STATE_BLOB_BYTES,
    MAX_STATS,
    MAX_VCPUS,
    MAX_WORKLOAD_KEY_LEN,
    MAX_WORKLOAD_KEYS,
    MAX_WORKLOAD_STR_LEN,
    MAX_ZERO_BITMAP_BYTES,
    MAX_ZERO_MAP_MESSAGE_BYTES,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    U64_MAX,
)

__all__ = [
    "REQUEST_KINDS",
    "Complete",
    "ErrorReply",
    "MemoryRegion",
    "Message",
    "MigrationHeader",
    "PageBatch",
    "PageRequest",
    "PageRun",
    "RequestKind",
    "VcpuState",
    "VmState",
    "ZeroMap",
    "PageBatchHead",
    "build_page_batch",
    "decode_any",
    "parse_page_batch_head",
    "find_region",
    "page_batch_parts",
]

# An all-zero page; page_batch_parts compares each page against it (one memcmp).
_ZERO_VIEW: Final = memoryview(bytes(PAGE_SIZE))
# One UTF-8 character is at most this many bytes; msgpack limits count bytes, fields count chars.
_UTF8_MAX: Final = 4
# Room in every message's msgpack limits for a type name and a few unknown fields, so that a
# message of the wrong type or with an extra field is reported by name, not as malformed.
_MAX_TYPE_LEN: Final = 32
_SPARE_KEYS: Final = 4

_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_NAME_RE: Final = re.compile(r"[a-z0-9_]+")

RequestKind: TypeAlias = Literal["demand", "readahead", "background"]
REQUEST_KINDS: Final[frozenset[str]] = frozenset({"demand", "readahead", "background"})


# --- validation helpers: each names the field and shows the (possibly hostile) value briefly


def _show(value: object) -> str:
    """A short rendering of any value for an error message; never expensive."""
    if type(value) is int:
        return hex(value) if value.bit_length() > 64 else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{type(value).__name__} of {len(value)} bytes>"
    if isinstance(value, str):
        return repr(value) if len(value) <= 64 else repr(value[:64]) + "..."
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    return f"<{type(value).__name__}>"


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if type(value) is not int:
        raise ProtoError(f"{name} must be an int, got {_show(value)}")
    if not low <= value <= high:
        raise ProtoError(f"{name} must be in [{low}, {high}], got {_show(value)}")
    return value


def _check_gpa(name: str, value: object, npages: int = 1) -> int:
    """A page-aligned guest physical address whose `npages` pages are below MAX_GPA."""
    if type(value) is not int:
        raise ProtoError(f"{name} must be an int, got {_show(value)}")
    if value % PAGE_SIZE:
        raise ProtoError(f"{name} must be page-aligned (a multiple of {PAGE_SIZE}), got {value:#x}")
    if not 0 <= value <= MAX_GPA - npages * PAGE_SIZE:
        raise ProtoError(f"{name} {_show(value)} with {npages} pages is outside [0, {MAX_GPA:#x})")
    return value


def _check_bytes(name: str, value: object, max_len: int, min_len: int = 0) -> bytes:
    if not isinstance(value, bytes):
        raise ProtoError(f"{name} must be bytes, got {_show(value)}")
    if not min_len <= len(value) <= max_len:
        expected = f"exactly {max_len}" if min_len == max_len else f"{min_len}..{max_len}"
        raise ProtoError(f"{name} must be {expected} bytes, got {len(value)}")
    return value


def _check_str(name: str, value: object, max_len: int, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str):
        raise ProtoError(f"{name} must be a str, got {_show(value)}")
    if len(value) > max_len:
        raise ProtoError(f"{name} must be at most {max_len} characters, got {len(value)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise ProtoError(f"{name} must match {pattern.pattern}, got {_show(value)}")
    return value


def _check_sequence(name: str, value: object, item_type: type, min_len: int, max_len: int) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ProtoError(f"{name} must be a list, got {_show(value)}")
    if not min_len <= len(value) <= max_len:
        raise ProtoError(f"{name} must have {min_len}..{max_len} items, got {len(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, item_type):
            raise ProtoError(f"{name}[{index}] must be a {item_type.__name__}, got {_show(item)}")
    return tuple(value)


def _check_map(name: str, value: object, max_items: int, key_max_len: int) -> dict[str, Any]:
    """A dict whose keys are names of [a-z0-9_]; the caller checks the values."""
    if not isinstance(value, dict):
        raise ProtoError(f"{name} must be a map, got {_show(value)}")
    if len(value) > max_items:
        raise ProtoError(f"{name} must have at most {max_items} entries, got {len(value)}")
    for key in value:
        _check_str(f"{name} key", key, key_max_len, _NAME_RE)
    return dict(value)


def _check_bitmap_padding(name: str, bitmap: bytes, nbits: int) -> int:
    """The bitmap as an int (bit i = page i); bits past `nbits` must be clear."""
    bits = int.from_bytes(bitmap, "little")
    if bits >> nbits:
        raise ProtoError(f"{name} has bits set past its {nbits} pages (last byte {bitmap[-1]:#04x})")
    return bits


def _set(record: object, name: str, value: object) -> None:
    """Normalise a field of a frozen record (a list to a tuple, a dict to a private copy)."""
    object.__setattr__(record, name, value)


def _check_keys(where: str, obj: object, keys: frozenset[str]) -> dict[Any, Any]:
    """`obj` is a map with exactly `keys`: a field missing or unknown is an error."""
    if type(obj) is not dict:
        raise ProtoError(f"{where} must be a map, got {_show(obj)}")
    if obj.keys() != keys:
        missing = ", ".join(sorted(map(repr, keys - obj.keys())))
        unknown = ", ".join(sorted(_show(key) for key in obj.keys() - keys))
        problems = [
            f"missing field {missing}" if missing else "",
            f"unknown field {unknown}" if unknown else "",
        ]
        raise ProtoError(f"{where}: " + "; ".join(filter(None, problems)))
    return obj


_Record = TypeVar("_Record", "MemoryRegion", "VcpuState", "VmState", "PageRun")


def _nested(where: str, record: type[_Record], obj: object) -> _Record:
    """Build a nested record from its wire map; an error says where in the message it sits."""
    fields = _check_keys(where, obj, record._KEYS)
    try:
        return record(**fields)
    except ProtoError as error:
        raise ProtoError(f"{where}: {error}") from None


# --- the envelope: one msgpack map with "v" and "t", unpacked under per-message limits


class _Limits(NamedTuple):
    """Bounds handed to msgpack so hostile input cannot make it allocate or recurse much."""

    max_message: int  # bytes of the whole encoded message
    max_bin: int
    max_str: int  # bytes, not characters
    max_array: int
    max_map: int


def _unpack(data: object, limits: _Limits, what: str) -> dict[Any, Any]:
    """Unpack one message map and check its version; the only place msgpack parses input."""
    if isinstance(data, (bytes, bytearray)):
        size = len(data)
    elif isinstance(data, memoryview):
        size = data.nbytes
    else:
        raise ProtoError(f"a {what} message must be bytes, got {_show(data)}")
    if size > limits.max_message:
        raise ProtoError(f"{what} message of {size} bytes is over its limit of {limits.max_message}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=False,
            max_bin_len=limits.max_bin,
            max_str_len=limits.max_str,
            max_array_len=limits.max_array,
            max_map_len=limits.max_map,
            max_ext_len=0,
        )
    except Exception as error:  # msgpack raises ValueError, TypeError, its own types...: all malformed
        raise ProtoError(f"malformed {what} message: {type(error).__name__}: {error}") from None
    if type(obj) is not dict:
        raise ProtoError(f"a {what} message must be a msgpack map, got {_show(obj)}")
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtoError(
            f"unsupported protocol version {_show(version)}, this side speaks {PROTOCOL_VERSION}"
        )
    return obj


class _Message:
    """What every top-level message shares: its type name, limits and decode."""

    __slots__ = ()
    TYPE: ClassVar[str]
    _KEYS: ClassVar[frozenset[str]]
    _LIMITS: ClassVar[_Limits]

    @classmethod
    def decode(cls, data: Buffer) -> Self:
        """The message encoded in `data`; ProtoError if it is anything else or invalid."""
        obj = _unpack(data, cls._LIMITS, cls.TYPE)
        message_type = obj.get("t")
        if message_type != cls.TYPE:
            raise ProtoError(f"expected a {cls.TYPE} message, got t={_show(message_type)}")
        return cls._from_wire(obj)

    @classmethod
    def _from_wire(cls, obj: dict[Any, Any]) -> Self:
        return cls._build(_check_keys(cls.TYPE, obj, cls._KEYS))

    @classmethod
    def _build(cls, fields: dict[Any, Any]) -> Self:
        """The record from a map with exactly its keys (the envelope's are dropped here)."""
        del fields["v"], fields["t"]
        try:
            return cls(**fields)
        except ProtoError as error:
            raise ProtoError(f"{cls.TYPE}: {error}") from None


def _envelope_keys(*names: str) -> frozenset[str]:
    return frozenset(("v", "t", *names))


def _seal(body: dict[str, Any]) -> bytes:
    """`body` encoded with "sum" last: the xxh3_64 of its encoding without that key. msgpack's
    encoding of a decoded map is canonical, so the receiver re-encodes and compares."""
    body["sum"] = xxh3_64_intdigest(msgpack.packb(body))
    return msgpack.packb(body)


def _unseal(what: str, obj: dict[Any, Any], keys: frozenset[str]) -> dict[Any, Any]:
    """The fields of a sealed message, "sum" checked and dropped."""
    fields = _check_keys(what, obj, keys)
    claimed = fields.pop("sum")
    if xxh3_64_intdigest(msgpack.packb(fields)) != claimed:
        raise ProtoError(f"{what}: checksum mismatch: the message was damaged on the way")
    return fields


def _bits(bitmap: bytes, first: int, npages: int) -> int:
    """Bits first..first+npages-1 of a page bitmap (LSB first), as an int (bit 0 = page `first`)."""
    chunk = bitmap[first // 8 : (first + npages + 7) // 8 + 1]
    return (int.from_bytes(chunk, "little") >> (first % 8)) & ((1 << npages) - 1)


def _limits(
    keys: frozenset[str],
    max_message: int,
    max_bin: int = 0,
    max_str: int = 0,
    max_array: int = 0,
    max_map: int = 0,
) -> _Limits:
    """A message's msgpack limits; every message may hold its own keys and a type name."""
    return _Limits(
        max_message=max_message,
        max_bin=max_bin,
        max_str=max(max_str, _MAX_TYPE_LEN),
        max_array=max_array,
        max_map=max(max_map, len(keys) + _SPARE_KEYS),
    )


# --- records nested inside the header


@dataclass(slots=True, frozen=True)
class MemoryRegion:
    """A range of guest RAM: page-aligned, non-empty."""

    gpa: int
    size: int

    _KEYS: ClassVar[frozenset[str]] = frozenset({"gpa", "size"})

    def __post_init__(self) -> None:
        _check_int("size", self.size, PAGE_SIZE, MAX_GUEST_BYTES)
        if self.size % PAGE_SIZE:
            raise ProtoError(f"size must be a multiple of {PAGE_SIZE}, got {self.size:#x}")
        _check_gpa("gpa", self.gpa, self.size // PAGE_SIZE)

    @property
    def end(self) -> int:
        """The first gpa past the region."""
        return self.gpa + self.size

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    def _to_wire(self) -> dict[str, Any]:
        return {"gpa": self.gpa, "size": self.size}


def find_region(regions: Iterable[MemoryRegion], gpa: int) -> MemoryRegion | None:
    """The region holding `gpa`, or None."""
    for region in regions:
        if region.gpa <= gpa < region.end:
            return region
    return None


# Raw kernel structs of a vCPU, as KVM_GET_* return them; the VMM checks exact sizes on restore.
_VCPU_BLOBS: Final = (
    "regs", "sregs", "fpu", "xsave", "xcrs", "lapic", "events", "mp_state", "debugregs", "cpuid", "msrs",
)  # fmt: skip
_VCPU_REQUIRED_BLOBS: Final = frozenset({"regs", "sregs"})


@dataclass(slots=True, frozen=True)
class VcpuState:
    """One vCPU's state: raw kernel-struct blobs, each at most MAX_STATE_BLOB_BYTES.

    cpuid is a struct kvm_cpuid2 with its entries; msrs is a packed array of
    struct kvm_msr_entry (u32 index, u32 pad, u64 data).
    """

    id: int
    regs: bytes = field(repr=False)
    sregs: bytes = field(repr=False)
    fpu: bytes = field(repr=False)
    xsave: bytes = field(repr=False)
    xcrs: bytes = field(repr=False)
    lapic: bytes = field(repr=False)
    events: bytes = field(repr=False)
    mp_state: bytes = field(repr=False)
    debugregs: bytes = field(repr=False)
    cpuid: bytes = field(repr=False)
    msrs: bytes = field(repr=False)

    _KEYS: ClassVar[frozenset[str]] = frozenset({"id", *_VCPU_BLOBS})

    def __post_init__(self) -> None:
        _check_int("id", self.id, 0, MAX_VCPUS - 1)
        for name in _VCPU_BLOBS:
            _check_bytes(
                name, getattr(self, name), MAX_STATE_BLOB_BYTES, 1 if name in _VCPU_REQUIRED_BLOBS else 0
            )
        if len(self.msrs) % KVM_MSR_ENTRY_SIZE:
            raise ProtoError(
                f"msrs must be whole {KVM_MSR_ENTRY_SIZE}-byte kvm_msr_entry records, "
                f"got {len(self.msrs)} bytes"
            )

    def _to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"id": self.id}
        for name in _VCPU_BLOBS:
            wire[name] = getattr(self, name)
        return wire


@dataclass(slots=True, frozen=True)
class VmState:
    """VM-wide kernel state: kvm_clock_data, one kvm_irqchip per chip, kvm_pit_state2; any may be empty."""

    clock: bytes = field(repr=False)
    irqchip: tuple[bytes, ...] = field(repr=False)
    pit2: bytes = field(repr=False)

    _KEYS: ClassVar[frozenset[str]] = frozenset({"clock", "irqchip", "pit2"})

    def __post_init__(self) -> None:
        _check_bytes("clock", self.clock, MAX_STATE_BLOB_BYTES)
        _set(self, "irqchip", _check_sequence("irqchip", self.irqchip, bytes, 0, MAX_IRQCHIPS))
        for index, chip in enumerate(self.irqchip):
            _check_bytes(f"irqchip[{index}]", chip, MAX_STATE_BLOB_BYTES)
        _check_bytes("pit2", self.pit2, MAX_STATE_BLOB_BYTES)

    def _to_wire(self) -> dict[str, Any]:
        return {"clock": self.clock, "irqchip": self.irqchip, "pit2": self.pit2}


@dataclass(slots=True, frozen=True)
class PageRun:
    """Contiguous guest pages sent whole: `data` is a whole number of pages starting at `gpa`."""

    gpa: int
    data: bytes = field(repr=False)

    _KEYS: ClassVar[frozenset[str]] = frozenset({"gpa", "data"})

    def __post_init__(self) -> None:
        _check_bytes("data", self.data, MAX_EAGER_BYTES, PAGE_SIZE)
        if len(self.data) % PAGE_SIZE:
            raise ProtoError(f"data must be a whole number of pages, got {len(self.data)} bytes")
        _check_gpa("gpa", self.gpa, len(self.data) // PAGE_SIZE)

    @property
    def npages(self) -> int:
        return len(self.data) // PAGE_SIZE

    @property
    def end(self) -> int:
        return self.gpa + len(self.data)

    def _to_wire(self) -> dict[str, Any]:
        return {"gpa": self.gpa, "data": self.data}


# --- messages


@dataclass(slots=True, frozen=True)
class MigrationHeader(_Message):
    """Everything the destination needs before it runs the guest; pages come later on demand.

    eager runs carry pages pushed up front. The zero map is not here: building it costs time
    that grows with the guest, so it follows the resume as a ZeroMap (check_zero_map).
    paused_at_ns is the source's CLOCK_MONOTONIC at the pause, comparable only where
    boot_id (the source kernel's /proc/sys/kernel/random/boot_id) is the same.

    On the wire it carries "sum" (_seal): the eager pages and the vCPU state are installed as
    they come, so the whole header is checked.
    """

    migration_id: str
    page_size: int
    regions: tuple[MemoryRegion, ...]
    vcpus: tuple[VcpuState, ...]
    vm_state: VmState
    devices: dict[str, bytes] = field(repr=False)
    eager: tuple[PageRun, ...] = field(repr=False)
    paused_at_ns: int
    boot_id: str
    workload: dict[str, int | str]

    TYPE: ClassVar[str] = "migration_header"
    _KEYS: ClassVar[frozenset[str]] = _envelope_keys(
        "migration_id", "page_size", "regions", "vcpus", "vm_state", "devices",
        "eager", "paused_at_ns", "boot_id", "workload", "sum",
    )  # fmt: skip
    _LIMITS: ClassVar[_Limits] = _limits(
        _KEYS,
        max_message=MAX_HEADER_MESSAGE_BYTES,
        max_bin=max(MAX_EAGER_BYTES, MAX_DEVICE_STATE_BYTES, MAX_STATE_BLOB_BYTES),
        max_str=max(MAX_ID_LEN, MAX_WORKLOAD_STR_LEN * _UTF8_MAX, MAX_DEVICE_NAME_LEN, MAX_WORKLOAD_KEY_LEN),
        max_array=max(MAX_REGIONS, MAX_VCPUS, MAX_IRQCHIPS, MAX_EAGER_RUNS),
        max_map=max(len(VcpuState._KEYS), MAX_DEVICES, MAX_WORKLOAD_KEYS),
    )

    def __post_init__(self) -> None:
        _check_str("migration_id", self.migration_id, MAX_ID_LEN, _ID_RE)
        if self.page_size != PAGE_SIZE or type(self.page_size) is not int:
            raise ProtoError(f"page_size must be {PAGE_SIZE}, got {_show(self.page_size)}")
        self._check_regions()
        self._check_vcpus()
        if not isinstance(self.vm_state, VmState):
            raise ProtoError(f"vm_state must be a VmState, got {_show(self.vm_state)}")
        self._check_devices()
        self._check_eager()
        _check_int("paused_at_ns", self.paused_at_ns, 0, I64_MAX)
        _check_str("boot_id", self.boot_id, MAX_ID_LEN, _ID_RE)
        self._check_workload()

    def _check_regions(self) -> None:
        regions = _check_sequence("regions", self.regions, MemoryRegion, 1, MAX_REGIONS)
        _set(self, "regions", regions)
        for previous, region in pairwise(regions):
            if region.gpa < previous.end:
                raise ProtoError(
                    f"regions must be sorted and not overlap: region at {region.gpa:#x} "
                    f"starts before the previous one ends at {previous.end:#x}"
                )
        total = sum(region.size for region in regions)
        if total > MAX_GUEST_BYTES:
            raise ProtoError(f"regions total {total:#x} bytes, over the limit of {MAX_GUEST_BYTES:#x}")

    def _check_vcpus(self) -> None:
        vcpus = _check_sequence("vcpus", self.vcpus, VcpuState, 1, MAX_VCPUS)
        _set(self, "vcpus", vcpus)
        ids = [vcpu.id for vcpu in vcpus]
        if len(set(ids)) != len(ids):
            raise ProtoError(f"vcpus ids must be unique, got {ids}")

    def _check_devices(self) -> None:
        devices = _check_map("devices", self.devices, MAX_DEVICES, MAX_DEVICE_NAME_LEN)
        _set(self, "devices", devices)
        for name, blob in devices.items():
            _check_bytes(f"devices[{name!r}]", blob, MAX_DEVICE_STATE_BYTES)

    def _check_eager(self) -> None:
        eager = _check_sequence("eager", self.eager, PageRun, 0, MAX_EAGER_RUNS)
        _set(self, "eager", eager)
        total = 0
        previous_end = 0
        for index, run in enumerate(eager):
            where = f"eager[{index}] at gpa {run.gpa:#x} of {run.npages} pages"
            region = find_region(self.regions, run.gpa)
            if region is None or run.end > region.end:
                raise ProtoError(f"{where} is not wholly inside one memory region")
            if run.gpa < previous_end:
                raise ProtoError(
                    f"{where} is out of order or overlaps the previous run ending at {previous_end:#x}"
                )
            previous_end = run.end
            total += len(run.data)
        if total > MAX_EAGER_BYTES:
            raise ProtoError(f"eager runs total {total} bytes, over the limit of {MAX_EAGER_BYTES}")

    def _check_workload(self) -> None:
        workload = _check_map("workload", self.workload, MAX_WORKLOAD_KEYS, MAX_WORKLOAD_KEY_LEN)
        _set(self, "workload", workload)
        for key, value in workload.items():
            if isinstance(value, str):
                _check_str(f"workload[{key!r}]", value, MAX_WORKLOAD_STR_LEN)
            else:
                _check_int(f"workload[{key!r}]", value, I64_MIN, I64_MAX)

    @property
    def total_pages(self) -> int:
        return sum(region.npages for region in self.regions)

    def page_index(self, gpa: int) -> int:
        """The bit of `gpa`'s page in the zero map: its index over all regions in order."""
        index = 0
        for region in self.regions:
            if region.gpa <= gpa < region.end:
                return index + (gpa - region.gpa) // PAGE_SIZE
            index += region.npages
        raise ProtoError(f"gpa {_show(gpa)} is in no memory region")

    def check_zero_map(self, zero_map: "ZeroMap") -> None:
        """ProtoError unless `zero_map` is this migration's and fits its regions: exactly
        ceil(total_pages / 8) bytes, padding bits clear, no eager page marked zero."""
        if zero_map.migration_id != self.migration_id:
            raise ProtoError(f"zero map of migration {_show(zero_map.migration_id)}, "
                             f"the header's is {_show(self.migration_id)}")
        bitmap = zero_map.zero_bitmap
        expected = (self.total_pages + 7) // 8
        _check_bytes("zero_bitmap", bitmap, expected, expected)
        _check_bitmap_padding("zero_bitmap", bitmap, self.total_pages)
        for index, run in enumerate(self.eager):
            zero = _bits(bitmap, self.page_index(run.gpa), run.npages)
            if zero:
                first = (zero & -zero).bit_length() - 1
                raise ProtoError(f"zero_bitmap marks page at gpa {run.gpa + first * PAGE_SIZE:#x} "
                                 f"of eager[{index}] zero")

    def encode(self) -> bytes:
        body = {
            "v": PROTOCOL_VERSION,
            "t": self.TYPE,
            "migration_id": self.migration_id,
            "page_size": self.page_size,
            "regions": [region._to_wire() for region in self.regions],
            "vcpus": [vcpu._to_wire() for vcpu in self.vcpus],
            "vm_state": self.vm_state._to_wire(),
            "devices": self.devices,
            "eager": [run._to_wire() for run in self.eager],
            "paused_at_ns": self.paused_at_ns,
            "boot_id": self.boot_id,
            "workload": self.workload,
        }
        return _seal(body)

    @classmethod
    def _from_wire(cls, obj: dict[Any, Any]) -> Self:
        fields = _unseal(cls.TYPE, obj, cls._KEYS)
        for name, record in (("regions", MemoryRegion), ("vcpus", VcpuState), ("eager", PageRun)):
            items = fields[name]
            if isinstance(items, tuple):  # otherwise the constructor names the wrong type
                fields[name] = tuple(_nested(f"{name}[{i}]", record, item) for i, item in enumerate(items))
        fields["vm_state"] = _nested("vm_state", VmState, fields["vm_state"])
        return cls._build(fields)


@dataclass(slots=True, frozen=True)
class ZeroMap(_Message):
    """The source's zero map, fetched after the resume (GET /v1/migration/zero-map).

    zero_bitmap has one bit per page over all regions concatenated in order, least significant
    bit first within a byte: a set bit means the page is all zeros on the paused source, so the
    destination installs a zero page and never asks for it. Sealed with "sum" like the header:
    one flipped bit would install a data page as zeros. MigrationHeader.check_zero_map checks
    it against the header's regions and eager pages.
    """

    migration_id: str
    zero_bitmap: bytes = field(repr=False)

    TYPE: ClassVar[str] = "zero_map"
    _KEYS: ClassVar[frozenset[str]] = _envelope_keys("migration_id", "zero_bitmap", "sum")
    _LIMITS: ClassVar[_Limits] = _limits(
        _KEYS, max_message=MAX_ZERO_MAP_MESSAGE_BYTES, max_bin=MAX_ZERO_BITMAP_BYTES, max_str=MAX_ID_LEN
    )

    def __post_init__(self) -> None:
        _check_str("migration_id", self.migration_id, MAX_ID_LEN, _ID_RE)
        _check_bytes("zero_bitmap", self.zero_bitmap, MAX_ZERO_BITMAP_BYTES, 1)

    def encode(self) -> bytes:
        return _seal({"v": PROTOCOL_VERSION, "t": self.TYPE, "migration_id": self.migration_id,
                      "zero_bitmap": self.zero_bitmap})

    @classmethod
    def _from_wire(cls, obj: dict[Any, Any]) -> Self:
        return cls._build(_unseal(cls.TYPE, obj, cls._KEYS))


@dataclass(slots=True, frozen=True)
class PageRequest(_Message):
    """Ask for `count` pages from `gpa`; `kind` says why (the server may prioritise by it)."""

    gpa: int
    count: int
    kind: RequestKind

    TYPE: ClassVar[str] = "page_request"
    _KEYS: ClassVar[frozenset[str]] = _envelope_keys("gpa", "count", "kind")
    _LIMITS: ClassVar[_Limits] = _limits(_KEYS, max_message=MAX_REQUEST_MESSAGE_BYTES)

    def __post_init__(self) -> None:
        _check_int("count", self.count, 1, MAX_BATCH_PAGES)
        _check_gpa("gpa", self.gpa, self.count)
        if type(self.kind) is not str or self.kind not in REQUEST_KINDS:  # a map or list is unhashable
            raise ProtoError(f"kind must be one of {sorted(REQUEST_KINDS)}, got {_show(self.kind)}")

    def validate_range(self, regions: Iterable[MemoryRegion]) -> None:
        """ProtoError unless the requested pages lie wholly inside one region.

        Alignment and the count limit hold for every PageRequest (they are checked when it is
        made or decoded); this is the check against one guest's memory map.
        """
        region = find_region(regions, self.gpa)
        if region is None:
            raise ProtoError(f"gpa {self.gpa:#x} is in no memory region")
        if self.gpa + self.count * PAGE_SIZE > region.end:
            raise ProtoError(
                f"count {self.count} from gpa {self.gpa:#x} runs past the end of the region "
                f"[{region.gpa:#x}, {region.end:#x})"
            )

    def encode(self) -> bytes:
        return msgpack.packb(
            {"v": PROTOCOL_VERSION, "t": self.TYPE, "gpa": self.gpa, "count": self.count, "kind": self.kind}
        )


@dataclass(slots=True, frozen=True)
class PageBatch(_Message):
    """The answer to a PageRequest: `count` pages from `gpa`.

    zero is a bitmap of `count` bits (LSB first): a set bit marks an all-zero page, which is
    not in data. data holds the other pages back to back in order; sum is the xxh3_64 of data
    (one call over the whole batch: a call per page cost more than the hashing, on both sides).
    """

    gpa: int
    count: int
    zero: bytes = field(repr=False)
    # bytes, or a view of a receive buffer (parse_page_batch_head: the pages never copied)
    data: bytes | memoryview = field(repr=False)
    sum: int = field(repr=False)

    TYPE: ClassVar[str] = "page_batch"
    _KEYS: ClassVar[frozenset[str]] = _envelope_keys("gpa", "count", "zero", "data", "sum")
    _LIMITS: ClassVar[_Limits] = _limits(_KEYS, max_message=MAX_BATCH_MESSAGE_BYTES, max_bin=MAX_BATCH_BYTES)

    def __post_init__(self) -> None:
        _check_int("count", self.count, 1, MAX_BATCH_PAGES)
        _check_gpa("gpa", self.gpa, self.count)
        bitmap_len = (self.count + 7) // 8
        _check_bytes("zero", self.zero, bitmap_len, bitmap_len)
        nonzero = self.count - _check_bitmap_padding("zero", self.zero, self.count).bit_count()
        data = self.data
        if not (type(data) is bytes or type(data) is memoryview and data.c_contiguous and data.itemsize == 1) \
                or len(data) != nonzero * PAGE_SIZE:
            raise ProtoError(
                f"data must be bytes holding the {nonzero} non-zero pages "
                f"({nonzero * PAGE_SIZE} bytes), got {_show(self.data)}"
            )
        _check_int("sum", self.sum, 0, U64_MAX)

    def check_answers(self, request: PageRequest) -> None:
        """ProtoError unless this batch is the answer to `request`."""
        if self.gpa != request.gpa:
            raise ProtoError(f"response for gpa {self.gpa:#x} does not match request gpa {request.gpa:#x}")
        if self.count != request.count:
            raise ProtoError(
                f"response count {self.count} at gpa {self.gpa:#x} "
                f"does not match request count {request.count}"
            )

    def verify(self) -> None:
        """ProtoError naming the batch unless its data matches its checksum."""
        actual = pages_sum(self.data)
        if actual != self.sum:
            raise ProtoError(
                f"the {len(self.data) // PAGE_SIZE} data pages of the batch at gpa {self.gpa:#x} "
                f"(count {self.count}) fail their checksum: sent {self.sum:#018x}, computed {actual:#018x}"
            )

    def runs(self) -> Iterator[tuple[int, int, memoryview | None]]:
        """(gpa, npages, data) for each maximal run of zero (data None) or non-zero pages.

        The destination installs each run with one UFFDIO_ZEROPAGE or UFFDIO_COPY.
        """
        zero = int.from_bytes(self.zero, "little")
        data = memoryview(self.data)
        page = 0
        offset = 0
        while page < self.count:
            rest = zero >> page
            if rest & 1:
                npages = (rest ^ (rest + 1)).bit_length() - 1  # trailing ones
                yield self.gpa + page * PAGE_SIZE, npages, None
            else:
                npages = (rest & -rest).bit_length() - 1 if rest else self.count - page  # trailing zeros
                end = offset + npages * PAGE_SIZE
                yield self.gpa + page * PAGE_SIZE, npages, data[offset:end]
                offset = end
            page += npages

    def encode(self) -> bytes:
        return _pack_batch(self.gpa, self.count, self.zero, self.data, self.sum)

    @classmethod
    def with_data(cls, head: "PageBatchHead", data: memoryview) -> Self:
        """The batch whose head ``parse_page_batch_head`` read, its data received into ``data``."""
        return cls._build({**head.fields, "data": data})


class PageBatchHead(NamedTuple):
    """A PageBatch's encoding up to its data: the other fields, and where the data lies."""

    fields: dict[Any, Any]
    data_offset: int  # in the encoded message
    data_len: int


def parse_page_batch_head(head: Buffer, total: int) -> PageBatchHead | None:
    """The fields of the PageBatch whose ``total``-byte encoding starts with ``head``, when its
    data is the last entry of its map (as page_batch_parts sends it) and starts within ``head``:
    so a receiver can take the pages as a view of its receive buffer instead of a copy
    (msgpack copies every bin it unpacks). None when the message is not like that (another
    type, data not last, ``head`` too short): decode the whole message then, which also names
    what is wrong. ProtoError for what is malformed in ``head`` itself. The record is built by
    ``with_data``, whose checks are PageBatch's own. ``head`` is copied: pass only a prefix."""
    limits = PageBatch._LIMITS
    if total > limits.max_message:
        raise ProtoError(f"{PageBatch.TYPE} message of {total} bytes is over its limit of {limits.max_message}")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, use_list=False, max_buffer_size=len(head),
                                max_bin_len=limits.max_bin, max_str_len=limits.max_str,
                                max_array_len=limits.max_array, max_map_len=limits.max_map, max_ext_len=0)
    unpacker.feed(head)
    fields: dict[Any, Any] = {}
    try:
        entries = unpacker.read_map_header()
        for left in range(entries - 1, -1, -1):
            key = unpacker.unpack()
            if key != "data":
                fields[key] = unpacker.unpack()
                continue
            at = unpacker.tell()
            kind = head[at] if at < len(head) else -1
            size_bytes = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(kind, 0)
            if left or not size_bytes or at + 1 + size_bytes > len(head):
                return None
            data_len = int.from_bytes(head[at + 1 : at + 1 + size_bytes], "big")
            data_offset = at + 1 + size_bytes
            if data_offset + data_len != total:
                return None
            fields["data"] = None
            break
        else:
            return None
    except msgpack.OutOfData:
        return None
    except Exception as error:  # noqa: BLE001 - as _unpack: whatever msgpack raises is malformed
        raise ProtoError(f"malformed {PageBatch.TYPE} message: {type(error).__name__}: {error}") from None
    version = fields.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtoError(f"unsupported protocol version {_show(version)}, this side speaks {PROTOCOL_VERSION}")
    if fields.get("t") != PageBatch.TYPE:
        return None
    return PageBatchHead(_check_keys(PageBatch.TYPE, fields, PageBatch._KEYS), data_offset, data_len)


def _pack_batch(gpa: int, count: int, zero: bytes, data: Buffer, checksum: int) -> bytes:
    return msgpack.packb(
        {
            "v": PROTOCOL_VERSION,
            "t": PageBatch.TYPE,
            "gpa": gpa,
            "count": count,
            "zero": zero,
            "data": data,
            "sum": checksum,
        }
    )


def _pack_batch_fields(gpa: int, count: int, zero: bytes, checksum: int) -> bytes:
    """A PageBatch map without its data entry (page_batch_parts appends it)."""
    return msgpack.packb(
        {"v": PROTOCOL_VERSION, "t": PageBatch.TYPE, "gpa": gpa, "count": count, "zero": zero, "sum": checksum}
    )


_DATA_KEY: Final = msgpack.packb("data")


def page_batch_parts(gpa: int, count: int, memory: Buffer) -> list[Buffer]:
    """The encoded PageBatch for `count` pages at `gpa` whose contents are `memory`, as buffers
    to send back to back (their concatenation is the message).

    The server side of a PageRequest: zero pages are detected (one memcmp each against a
    zero page) and left out of data; the sum is computed over exactly the bytes sent. When no
    page is zero, the data part is `memory` itself: the pages are sent without a copy.
    """
    _check_int("count", count, 1, MAX_BATCH_PAGES)
    _check_gpa("gpa", gpa, count)
    view = memoryview(memory).cast("B")
    if view.nbytes != count * PAGE_SIZE:
        raise ProtoError(f"memory must be count * {PAGE_SIZE} = {count * PAGE_SIZE} bytes, got {view.nbytes}")
    zero_bits = 0
    # Only a page whose first qword is zero can be all zeros: those are compared whole, the
    # others never leave C (one strided view), so a written guest costs no loop per page.
    firsts = view.cast("Q")[:: PAGE_SIZE // 8].tolist()
    if 0 in firsts:
        for index, first in enumerate(firsts):
            if not first and view[index * PAGE_SIZE : (index + 1) * PAGE_SIZE] == _ZERO_VIEW:
                zero_bits |= 1 << index
    data: Buffer = view
    if zero_bits:
        data = b"".join(view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(count) if not zero_bits >> i & 1)
    zero = zero_bits.to_bytes((count + 7) // 8, "little")
    # Every field but data, packed as usual; data goes last, as its own part.
    head = bytearray(_pack_batch_fields(gpa, count, zero, pages_sum(data)))
    head[0] += 1  # one more map entry (a fixmap: the count is in the first byte's low bits)
    size = len(data)
    bin_head = (b"\xc4" + size.to_bytes(1, "big") if size < 1 << 8 else
                b"\xc5" + size.to_bytes(2, "big") if size < 1 << 16 else b"\xc6" + size.to_bytes(4, "big"))
    return [bytes(head) + _DATA_KEY + bin_head, data]


def build_page_batch(gpa: int, count: int, memory: Buffer) -> bytes:
    """page_batch_parts as one bytes object."""
    return b"".join(page_batch_parts(gpa, count, memory))


@dataclass(slots=True, frozen=True)
class Complete(_Message):
    """The destination has every page and has released the source; stats are counters for the log."""

    migration_id: str
    stats: dict[str, int]

    TYPE: ClassVar[str] = "complete"
    _KEYS: ClassVar[frozenset[str]] = _envelope_keys("migration_id", "stats")
    _LIMITS: ClassVar[_Limits] = _limits(
        _KEYS,
        max_message=MAX_COMPLETE_MESSAGE_BYTES,
        max_str=max(MAX_ID_LEN, MAX_STAT_NAME_LEN),
        max_map=MAX_STATS,
    )

    def __post_init__(self) -> None:
        _check_str("migration_id", self.migration_id, MAX_ID_LEN, _ID_RE)
        stats = _check_map("stats", self.stats, MAX_STATS, MAX_STAT_NAME_LEN)
        _set(self, "stats", stats)
        for name, value in stats.items():
            _check_int(f"stats[{name!r}]", value, 0, U64_MAX)

    def encode(self) -> bytes:
        return msgpack.packb(
            {"v": PROTOCOL_VERSION, "t": self.TYPE, "migration_id": self.migration_id, "stats": self.stats}
        )


@dataclass(slots=True, frozen=True)
class ErrorReply(_Message):
    """Why a request failed; `code` is the HTTP status it was (or would be) answered with."""

    code: int
    message: str

    TYPE: ClassVar[str] = "error"
    _KEYS: ClassVar[frozenset[str]] = _envelope_keys("code", "message")
    _LIMITS: ClassVar[_Limits] = _limits(
        _KEYS, max_message=MAX_ERROR_MESSAGE_BYTES, max_str=MAX_ERROR_MESSAGE_LEN * _UTF8_MAX
    )

    def __post_init__(self) -> None:
        _check_int("code", self.code, 400, 599)
        _check_str("message", self.message, MAX_ERROR_MESSAGE_LEN)

    def encode(self) -> bytes:
        return msgpack.packb(
            {"v": PROTOCOL_VERSION, "t": self.TYPE, "code": self.code, "message": self.message}
        )


Message: TypeAlias = MigrationHeader | ZeroMap | PageRequest | PageBatch | Complete | ErrorReply

_MESSAGE_TYPES: Final[Mapping[str, type[Message]]] = {
    message.TYPE: message for message in (MigrationHeader, ZeroMap, PageRequest, PageBatch, Complete, ErrorReply)
}
# decode_any cannot know the type before unpacking, so it unpacks under the loosest limits;
# each record's own checks still bound every field.
_ANY_LIMITS: Final = _Limits(
    *(max(column) for column in zip(*(m._LIMITS for m in _MESSAGE_TYPES.values()), strict=True))
)


def decode_any(data: Buffer) -> Message:
    """Whichever message `data` encodes, dispatched on its "t" field."""
    obj = _unpack(data, _ANY_LIMITS, "protocol")
    message_type = obj.get("t")
    message = _MESSAGE_TYPES.get(message_type) if type(message_type) is str else None
    if message is None:
        raise ProtoError(
            f"unknown message type t={_show(message_type)}, expected one of {sorted(_MESSAGE_TYPES)}"
        )
    return message._from_wire(obj)
