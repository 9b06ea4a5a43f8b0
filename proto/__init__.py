"""Wire messages between the migration source (page server) and the destination.

msgpack-encoded, strictly validated; decoders raise only ProtoError. See docs/protocol.md.
"""

from proto.checksum import pages_sum
from proto.errors import ProtoError
from proto.messages import (
    REQUEST_KINDS,
    Complete,
    ErrorReply,
    MemoryRegion,
    Message,
    MigrationHeader,
    PageBatch,
    PageBatchHead,
    PageRequest,
    PageRun,
    RequestKind,
    VcpuState,
    VmState,
    ZeroMap,
    build_page_batch,
    decode_any,
    page_batch_parts,
    parse_page_batch_head,
    find_region,
)
from proto.version import MAX_BATCH_PAGES, PAGE_SIZE, PROTOCOL_VERSION

__all__ = [
    "MAX_BATCH_PAGES",
    "PAGE_SIZE",
    "PROTOCOL_VERSION",
    "REQUEST_KINDS",
    "Complete",
    "ErrorReply",
    "MemoryRegion",
    "Message",
    "MigrationHeader",
    "PageBatch",
    "PageBatchHead",
    "PageRequest",
    "PageRun",
    "ProtoError",
    "RequestKind",
    "VcpuState",
    "VmState",
    "ZeroMap",
    "build_page_batch",
    "decode_any",
    "find_region",
    "page_batch_parts",
    "parse_page_batch_head",
    "pages_sum",
]
