"""What a page socket answers, and what it counts, apart from where it runs.

One ``PageAnswerer`` per page socket. It reads the migration's state from the page server's
``Board`` and guest RAM through views, and writes its counts into its own slot of the board.
The board is a memfd, mapped shared: the same answerer serves from a thread of the page server
or from a page worker, a process of its own (page_workers.py), which maps the board and guest
RAM itself. The server sees the worker's counts and the worker sees the server's state changes;
neither copies anything. Each slot has one writer (its socket), so no lock is needed: the page
server adds the slots up when it reports.
"""
from __future__ import annotations

import enum
import mmap
import os
from typing import Final

import msgpack

from proto import (
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    REQUEST_KINDS,
    ErrorReply,
    MemoryRegion,
    PageRequest,
    ProtoError,
    page_batch_parts,
)
from proto.checksum import Buffer
from proto.fastpath import ONE_PAGE_ANSWER_BYTES, one_page_head, parse_request
from proto.version import MAX_ERROR_MESSAGE_LEN, MAX_GPA, MAX_REQUEST_MESSAGE_BYTES
from vmm.libc import map_fd

__all__ = ["ERROR_CODES", "STATES", "Board", "Counts", "MigrationState", "PageAnswerer", "Span", "error_body"]

_ZERO_PAGE: Final = bytes(PAGE_SIZE)
PAGE_OFFSET_MASK: Final = PAGE_SIZE - 1
# Every status a page socket can answer with (answer, decode_error_code).
ERROR_CODES: Final = (400, 409, 413, 416)
KINDS: Final = tuple(sorted(REQUEST_KINDS))


class MigrationState(enum.Enum):
    """The source's migration states (page_server.py says what each means)."""

    RUNNING = "running"
    SERVING = "serving"
    COMPLETED = "completed"
    FAILED = "failed"


# The states as the board's state byte numbers them.
STATES: Final = tuple(s.value for s in MigrationState)
RUNNING, SERVING = STATES.index(MigrationState.RUNNING.value), STATES.index(MigrationState.SERVING.value)
# A region of guest RAM as a socket serves it: first gpa, end gpa, a view of its bytes.
Span = tuple[int, int, memoryview]


def error_body(code: int, message: str) -> bytes:
    return ErrorReply(code, message[:MAX_ERROR_MESSAGE_LEN]).encode()


class Counts:
    """A socket's counters: u64 cells in its slot of the board, in this order."""

    FIELDS: Final = ("pages_data", "pages_zero", "batch_bytes", "fast_pages",
                     *(f"requests.{k}" for k in KINDS), *(f"errors.{c}" for c in ERROR_CODES))
    PAGES_DATA, PAGES_ZERO, BATCH_BYTES, FAST_PAGES = range(4)
    REQUESTS: Final = {k: 4 + i for i, k in enumerate(KINDS)}
    ERRORS: Final = {c: 4 + len(KINDS) + i for i, c in enumerate(ERROR_CODES)}

    @staticmethod
    def add(total: list[int], counts: list[int]) -> None:
        for i, n in enumerate(counts):
            total[i] += n

    @classmethod
    def as_stats(cls, counts: list[int]) -> dict[str, object]:
        """Counts as ServerStats' fields: a one-page answer of the fast path (``fast_pages``)
        is a data page, a demand request and ONE_PAGE_ANSWER_BYTES of batch."""
        fast = counts[cls.FAST_PAGES]
        requests = {k: counts[i] for k, i in cls.REQUESTS.items()}
        requests["demand"] += fast
        return {"pages_data": counts[cls.PAGES_DATA] + fast, "pages_zero": counts[cls.PAGES_ZERO],
                "batch_bytes": counts[cls.BATCH_BYTES] + fast * ONE_PAGE_ANSWER_BYTES,
                "requests": requests, "errors": {c: counts[i] for c, i in cls.ERRORS.items() if counts[i]}}


FAST_PAGES: Final = Counts.FAST_PAGES  # the fault path's one count: no class lookup per page


class Board:
    """Shared memory of one page server and its page sockets: the state byte (first page),
    then one slot per socket: its counters, and a close request the server leaves for a socket
    served elsewhere (flag, code, reason). Made by the page server (``create``), mapped from
    its memfd by a page worker (``attach``)."""

    MAX_SLOTS: Final = 4096  # page sockets at once
    SLOT_BYTES: Final = 256
    COUNTS_BYTES: Final = len(Counts.FIELDS) * 8
    CLOSE_AT: Final = 128  # in a slot: flag, code (u16), reason length, reason (a close frame's)
    CLOSE_REASON_MAX: Final = SLOT_BYTES - CLOSE_AT - 4

    SIZE: Final = mmap.PAGESIZE + MAX_SLOTS * SLOT_BYTES

    def __init__(self, fd: int, view: memoryview) -> None:
        self.fd = fd
        self.view = view
        self.state = view[:1]
        self._free = list(range(self.MAX_SLOTS - 1, -1, -1))

    @classmethod
    def create(cls) -> Board:
        """The page server's board: a new memfd, mapped (its memfd passed on to page workers)."""
        assert cls.COUNTS_BYTES <= cls.CLOSE_AT
        fd = os.memfd_create("postcopy-page-board", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, cls.SIZE)
            return cls(fd, memoryview(mmap.mmap(fd, cls.SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)))
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> Board:
        """A page worker's board: the memfd ``fd`` mapped, then closed (the mapping stays)."""
        try:
            return cls(-1, map_fd(fd, cls.SIZE, writable=True))
        finally:
            os.close(fd)

    def set_state(self, name: str) -> None:
        self.state[0] = STATES.index(name)

    def take_slot(self) -> int | None:
        """A free slot, zeroed; None when MAX_SLOTS sockets hold one."""
        if not self._free:
            return None
        slot = self._free.pop()
        at = self._slot_at(slot)
        self.view[at:at + self.SLOT_BYTES] = bytes(self.SLOT_BYTES)
        return slot

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def counts(self, slot: int) -> memoryview:
        at = self._slot_at(slot)
        return self.view[at:at + self.COUNTS_BYTES].cast("Q")

    def request_close(self, slot: int, code: int, reason: str) -> None:
        raw = reason.encode("utf-8", "replace")[:self.CLOSE_REASON_MAX]
        at = self._slot_at(slot) + self.CLOSE_AT
        self.view[at + 1:at + 4] = code.to_bytes(2, "big") + bytes((len(raw),))
        self.view[at + 4:at + 4 + len(raw)] = raw
        self.view[at] = 1  # last: a reader sees a whole request or none

    def close_requested(self, slot: int) -> tuple[int, str] | None:
        at = self._slot_at(slot) + self.CLOSE_AT
        if not self.view[at]:
            return None
        length = self.view[at + 3]
        return int.from_bytes(self.view[at + 1:at + 3], "big"), bytes(self.view[at + 4:at + 4 + length]).decode(
            "utf-8", "replace")

    def _slot_at(self, slot: int) -> int:
        if not 0 <= slot < self.MAX_SLOTS:
            raise ValueError(f"no slot {slot} on the board (0 to {self.MAX_SLOTS - 1})")
        return mmap.PAGESIZE + slot * self.SLOT_BYTES

    def close(self) -> None:
        """Let the memfd go; the mapping goes with the last view of it (a socket's counts)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PageAnswerer:
    """Answers one page socket's frames from guest RAM while the state is SERVING."""

    def __init__(self, board: Board, slot: int, spans: list[Span]) -> None:
        self._state = board.state
        # One view of each region of guest RAM, sliced per request (no copy), valid while it
        # is mapped: the page server's owner unmaps it only after every socket is closed.
        self._spans = spans
        self._regions = [MemoryRegion(first, end - first) for first, end, _ in spans]
        self._q = board.counts(slot)

    def answer_page(self, gpa: int) -> tuple[bytes, memoryview] | None:
        """The fault path's answer: for a one-page demand request at ``gpa`` (the socket took
        it from the fixed layout) of a data page while serving, the fixed-layout batch head and
        the page, a view of guest RAM; counted as ``fast_pages``. None for anything else (not
        serving, a gpa misaligned or outside guest RAM, a zero page): answer() then answers it,
        with its errors and counts."""
        if self._state[0] != SERVING or gpa & PAGE_OFFSET_MASK:
            return None
        for first, end, region_view in self._spans:
            if first <= gpa and gpa + PAGE_SIZE <= end:
                page = region_view[gpa - first:gpa - first + PAGE_SIZE]
                if page == _ZERO_PAGE:
                    return None
                self._q[FAST_PAGES] += 1
                return one_page_head(gpa, page), page
        return None

    def answer(self, frame: bytes) -> tuple[list[Buffer], bool]:
        """The answer to one binary frame (one decode, one build; the pages as a view of guest
        RAM), and whether to close the socket after it."""
        state = self._state[0]
        if state != SERVING:
            if state == RUNNING:
                return self.error(409, "the guest still runs here: start the migration first"), False
            return self.error(409, f"the migration is {STATES[state]}: no more pages"), True
        fast = parse_request(frame)
        if fast is not None:
            gpa, count, kind = fast
        else:
            try:
                page_request = PageRequest.decode(frame)
            except ProtoError as error:
                return self.error(decode_error_code(frame), str(error)), False
            gpa, count, kind = page_request.gpa, page_request.count, page_request.kind
        for first, end, region_view in self._spans:
            if first <= gpa < end and gpa + count * PAGE_SIZE <= end:
                break
        else:
            try:
                PageRequest(gpa, count, kind).validate_range(self._regions)  # type: ignore[arg-type]
            except ProtoError as error:
                return self.error(416, str(error)), False
            raise AssertionError(f"no memory view for a valid request at gpa {gpa:#x}")
        offset = gpa - first
        pages = region_view[offset : offset + count * PAGE_SIZE]
        if count == 1 and pages != _ZERO_PAGE:  # a fault's page: the fixed layout, no copy
            parts: list[Buffer] = [one_page_head(gpa, pages), pages]
            data_pages = 1
        else:
            parts = page_batch_parts(gpa, count, pages)
            data_pages = len(parts[-1]) // PAGE_SIZE
        q = self._q
        q[Counts.PAGES_DATA] += data_pages
        q[Counts.PAGES_ZERO] += count - data_pages
        q[Counts.BATCH_BYTES] += len(parts[0]) + len(parts[-1])
        q[Counts.REQUESTS[kind]] += 1
        return parts, False

    def answer_text(self, frame: bytes) -> tuple[list[Buffer], bool]:
        return self.error(400, "page requests are binary msgpack frames, not text"), False

    def error(self, code: int, message: str) -> list[Buffer]:
        self._q[Counts.ERRORS[code]] += 1
        return [error_body(code, message)]


def decode_error_code(data: bytes) -> int:
    """The status for a frame that is no valid PageRequest: 413 too big (the frame, or count
    over MAX_BATCH_PAGES), 416 a gpa misaligned or past MAX_GPA, 400 anything else.
    Only this error path looks at the frame a second time."""
    if len(data) > MAX_REQUEST_MESSAGE_BYTES:
        return 413
    try:
        obj = msgpack.unpackb(data, raw=False, max_bin_len=0, max_ext_len=0,
                              max_str_len=MAX_REQUEST_MESSAGE_BYTES)
    except Exception:  # noqa: BLE001 - whatever msgpack raises, the frame is malformed
        return 400
    if type(obj) is not dict or obj.get("t") != PageRequest.TYPE:
        return 400
    gpa, count = obj.get("gpa"), obj.get("count")
    if type(count) is int and count > MAX_BATCH_PAGES:
        return 413
    if type(gpa) is not int or type(count) is not int or count < 1:
        return 400
    if gpa % PAGE_SIZE or not 0 <= gpa <= MAX_GPA - count * PAGE_SIZE:
        return 416
    return 400
