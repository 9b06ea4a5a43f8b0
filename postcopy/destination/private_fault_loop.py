"""Exit mode's fault loop as a vCPU thread runs it inside its private interpreter (vmm.interp).

This module is imported twice: by the destination, for ``Shared`` (what the two sides of the
loop exchange, by address), and inside a vCPU thread's private interpreter, where ``setup`` is
run once per vCPU and ``loop`` is then entered through the callback ``setup`` exports (the vCPUs
pinned to one CPU share an interpreter, each loop with its state in ``LOOPS``). The private side
shares no object with the destination: it reaches kvm_run, guest RAM, the page tracker's state
and arrival bytes, the zero map, the fault log's buffer and the connection's receive buffer by
address, and the vCPU, uffd and socket by fd number. So it imports nothing of the destination's
but the fault path's two fixed-layout messages.

``loop`` takes the usual fault of this host, an MMIO exit for an aligned qword in single-region
RAM: a present page is completed, a missing data page is fetched with the readahead's first
window (``base`` pages: the MISSING data pages right after it, where the source's zero map has
come; else one page) and installed with UFFDIO_COPY, then the access is completed and the guest
re-entered. Where the vCPU has readahead windows (``windows``), a fault where the last window
ended (``next_expected``: a scan) or on a page in flight goes back: the thread's own
interpreter doubles the window, claims it and starts the prefetcher (exit_mode.py). A first
window's pages are not claimed: a page another thread installs first is EEXIST here, counted
by its maker, as for the faulting page itself (pages.PageTracker.mark_created). It returns to
the vCPU thread's own interpreter for everything else (``status``):
- EXIT: KVM_RUN returned ``ret`` with an exit it does not take (a port I/O, a kick, a zero-map
  page, a scan's fault or one in flight, a fault while ``fetch_here`` is off); kvm_run still
  holds it;
- FLUSH: its fault log buffer is full (a record per exit taken; it counts requests too);
- FETCH: a fetch did not end in checked one-page answers: the request for ``page`` was sent,
  ``received`` bytes of its answer are at the front of the receive buffer, or ``error`` is the
  errno that broke the socket (-1: the server closed it; EPROTO: a window's answers did not
  all come in the fixed layout, so the socket is out of step and is opened again). The other
  side finishes the fetch of ``page`` alone, with its retries and its errors, installs and
  completes.
A failure of its own (a bug) returns ERROR with the traceback in the error buffer.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import threading
import traceback
from time import monotonic_ns
from typing import Any

from postcopy.busypoll import recv_into_polling
from postcopy.fastframes import ONE_PAGE_FRAME_BYTES as TOTAL
from postcopy.fastframes import ONE_PAGE_FRAME_HEAD as HEAD
from postcopy.fastframes import demand_frame
from proto.fastpath import ONE_PAGE_DATA_AT, one_page_ok
from vmm.priority import nice_relax, nice_urgent

EXIT, FLUSH, FETCH, ERROR, STOP, SERVE = 0, 1, 2, 3, 4, 5  # STOP, SERVE: the classic handler's loop
PRESENT = 1  # postcopy.destination.pages.PRESENT (not imported: this side imports no destination module)
EOF = -1  # Shared.error when the server closed the connection


class Shared(ctypes.Structure):
    """One vCPU's exchange between its thread's two interpreters."""

    _fields_ = [
        # Set by the vCPU thread's interpreter before each entry.
        ("fetch_here", ctypes.c_int64),  # 0: hand every missing page back (EXIT)
        ("sock_fd", ctypes.c_int64),  # the connection's socket, -1 with a local image
        ("buffer", ctypes.c_uint64), ("buffer_len", ctypes.c_int64),  # its receive buffer
        ("poll_ns", ctypes.c_int64),  # busypoll's window before a blocking recv
        ("image", ctypes.c_uint64),  # a local source: guest RAM's image, read by address
        ("zero", ctypes.c_uint64), ("zero_len", ctypes.c_int64),  # the tracker's zero map now
        # Set by the loop before it returns.
        ("status", ctypes.c_int64), ("ret", ctypes.c_int64),
        ("page", ctypes.c_int64), ("offset", ctypes.c_int64), ("t0", ctypes.c_uint64),
        ("received", ctypes.c_int64), ("error", ctypes.c_int64),
        ("urgent", ctypes.c_int64),  # FETCH: the thread runs at its own priority until it relaxes
        ("logged", ctypes.c_int64),  # fault records in the log buffer: one per MMIO exit it took
        ("requests", ctypes.c_int64),  # one-page requests sent since the last return
        ("made", ctypes.c_int64),  # pages its UFFDIO_COPY created, since setup (the tracker reads it)
        ("made_readahead", ctypes.c_int64),  # of those, the ones behind a faulting page in its window
        ("zero_known", ctypes.c_int64),  # the source's zero map has come: first windows may be wider than one page
        ("hva", ctypes.c_uint64),  # FETCH, classic: the faulting page's host address
        # With readahead windows: where the vCPU's (classic: the handler's) last window ended (a
        # fault there is a scan, handed back); set by both sides: a one-page fault ends one too.
        ("next_expected", ctypes.c_int64),
    ]

    def publish_zero_map(self, bitmap: bytes, known: bool) -> None:
        """The tracker's zero map by address (its owner keeps ``bitmap``), and whether it is the
        source's: ``zero_known`` last, so a loop that sees it set reads the new address (a
        loop in progress looks for it at its missing pages until it is set)."""
        self.zero, self.zero_len = ctypes.cast(ctypes.c_char_p(bitmap), ctypes.c_void_p).value or 0, len(bitmap)
        self.zero_known = known


# What each loop set up here binds, by its Shared's address: the vCPU threads pinned to one
# CPU share this interpreter (vmm.interp.acquire), each with a loop of its own.
LOOPS: dict[int, dict[str, Any]] = {}


def view(address: int, nbytes: int, fmt: str = "B") -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B").cast(fmt)


def setup(a: dict[str, Any]) -> None:
    """Bind the vCPU's memory (``a``: addresses, sizes, fds and constants, all numbers) and
    export ``loop``: its C address goes to ``a["entry"]``'s slot."""
    s = bind(a, run=view(a["run"], a["run_size"]), ram=view(a["hva_base"], a["ram_bytes"], "Q"),
             nice=view(a["nice_block"], 8 * a["nice_len"], "q"))
    export(s, loop)


def bind(a: dict[str, Any], **views: Any) -> dict[str, Any]:
    """A new loop's state (``a`` and ``views``, with what both loops read by address), kept in
    LOOPS by its Shared's address until its teardown."""
    teardown(a["shared"])  # what a loop before left at that address, if its teardown did not run
    s = LOOPS[a["shared"]] = dict(
        a, **views, shared=Shared.from_address(a["shared"]), state=view(a["state"], a["npages"]),
        arrival=view(a["arrival"], a["npages"]), log_t=view(a["log_t"], 8 * a["log_cap"], "Q"),
        log_latency=view(a["log_latency"], 8 * a["log_cap"], "Q"), sock=None, fetcher=None,
        error_text=view(a["error_text"], a["error_size"]))
    return s


def export(s: dict[str, Any], fn: Any) -> None:
    """Make ``fn`` (called with ``s``) the callback the other side enters: its C address goes
    to ``s["entry"]``'s slot; a failure in it returns ERROR with its traceback in the error
    buffer."""
    def entry() -> int:
        try:
            return fn(s)  # type: ignore[no-any-return]
        except BaseException:  # noqa: BLE001 (the other side raises it as its thread's failure)
            text = traceback.format_exc().encode("utf-8", "replace")
            out = s["error_text"]
            n = min(len(text), len(out) - 1)
            out[:n] = text[:n]
            out[n] = 0
            return ERROR
    callback = ctypes.CFUNCTYPE(ctypes.c_int64)(entry)
    s["entry_keep"] = callback  # the callback lives as long as its loop is set up
    ctypes.c_uint64.from_address(s["entry"]).value = ctypes.cast(callback, ctypes.c_void_p).value or 0


def teardown(shared: int) -> None:
    """The loop of the Shared at ``shared`` is done (its thread, or it never started): let go
    of the socket's fd without closing it (it is the connection's) and of every view."""
    s = LOOPS.pop(shared, None)
    if s is not None and s["sock"] is not None:
        s["sock"].detach()


def _socket(s: dict[str, Any], fd: int) -> socket.socket:
    """The connection's socket, wrapped once per fd (a reconnect brings a new one). Never
    closed here: detached when it changes."""
    sock = s["sock"]
    if sock is None or sock.fileno() != fd:
        if sock is not None:
            sock.detach()
        sock = s["sock"] = socket.socket(fileno=fd)
    return sock


class Handback(Exception):
    """A fetch that did not end in a checked one-page answer: the request was sent, and
    ``received`` bytes of its answer are at the receive buffer's front, or ``error`` broke the
    socket (FETCH: the other side finishes it)."""

    def __init__(self, received: int, error: int) -> None:
        super().__init__(received, error)
        self.received, self.error = received, error


class Fetcher:
    """One page on demand, as SyncPageConnection.fetch_page gets it (the fixed-layout request
    and answer, checked alike), over the connection's socket; or from a local image."""

    def __init__(self, s: dict[str, Any], sh: Shared) -> None:
        self.key = (sh.sock_fd, sh.buffer, sh.buffer_len, sh.poll_ns, sh.image)
        self.image, self.poll_ns = sh.image, sh.poll_ns
        self.requests = 0
        self.stride = 4096 if self.image else TOTAL  # from one page of a window to the next
        self.most = 1 << 20  # pages a window's answers may take (the receive buffer's)
        if not self.image:
            self.sock = _socket(s, sh.sock_fd)
            self.rbuf = view(sh.buffer, sh.buffer_len)
            self.most = sh.buffer_len // TOTAL
            self.data_at = sh.buffer + len(HEAD) + ONE_PAGE_DATA_AT
            self.keys, self.ki = os.urandom(4096), 0

    def page(self, gpa: int) -> int:
        """The address of the page at ``gpa``, checked; else Handback."""
        if self.image:
            return self.image + gpa
        self.requests += 1
        sock, rbuf, poll_ns, hl = self.sock, self.rbuf, self.poll_ns, len(HEAD)
        received = 0
        try:
            sock.sendall(demand_frame(gpa, self._key()))
            while True:
                n = recv_into_polling(sock, rbuf[received:], poll_ns) if poll_ns else sock.recv_into(rbuf[received:])
                if not n:
                    raise Handback(received, EOF)
                received += n
                if received >= hl and (rbuf[:hl] != HEAD or received >= TOTAL):
                    break
        except OSError as e:
            raise Handback(received, e.errno or errno.EIO) from None
        if received != TOTAL or rbuf[:hl] != HEAD or not one_page_ok(rbuf, hl, gpa):
            raise Handback(received, 0)
        return self.data_at

    def window(self, gpa: int, npages: int) -> int:
        """The address of the first of ``npages`` pages from ``gpa``, each checked, the next
        ``stride`` bytes on; else Handback. One one-page demand request a page, sent together
        and answered in order (the page socket's own order), so each answer keeps the fixed
        layout that needs no parser here. Any other answer leaves the socket out of step
        (EPROTO: the other side opens it again and asks for the faulting page alone)."""
        if npages == 1 or self.image:
            return self.page(gpa)
        self.requests += npages
        sock, rbuf, poll_ns, hl = self.sock, self.rbuf, self.poll_ns, len(HEAD)
        total, received, checked = npages * TOTAL, 0, 0  # checked: answers whose head was compared
        try:
            sock.sendall(b"".join([demand_frame(gpa + (i << 12), self._key()) for i in range(npages)]))
            while received < total:
                n = (recv_into_polling(sock, rbuf[received:total], poll_ns) if poll_ns
                     else sock.recv_into(rbuf[received:total]))
                if not n:
                    raise Handback(received, EOF)
                received += n
                while checked < npages and checked * TOTAL + hl <= received:  # a short frame ends the wait
                    if rbuf[checked * TOTAL:checked * TOTAL + hl] != HEAD:
                        raise Handback(received, errno.EPROTO)
                    checked += 1
        except OSError as e:
            raise Handback(received, e.errno or errno.EIO) from None
        for i in range(npages):
            if not one_page_ok(rbuf, i * TOTAL + hl, gpa + (i << 12)):
                raise Handback(received, errno.EPROTO)
        return self.data_at

    def _key(self) -> bytes:
        """The next 4-byte mask key (a client frame's, RFC 6455), from a random block."""
        ki = self.ki
        self.ki = (ki + 4) & 4095
        return self.keys[ki:ki + 4]


def fetcher(s: dict[str, Any], sh: Shared) -> Fetcher | None:
    """This entry's fetcher (None where the loop may not fetch): the one before, unless the
    socket, its buffer or the image changed."""
    if not sh.fetch_here:
        return None
    f = s["fetcher"]
    if f is None or f.key != (sh.sock_fd, sh.buffer, sh.buffer_len, sh.poll_ns, sh.image):
        f = s["fetcher"] = Fetcher(s, sh)
    f.requests = 0
    return f


def loop(s: dict[str, Any]) -> int:
    """KVM_RUN until an exit this side does not take; the status (Shared says what it left)."""
    sh: Shared = s["shared"]
    run, ram, state, arrival, log_t, log_latency = (s[k] for k in ("run", "ram", "state", "arrival", "log_t",
                                                                    "log_latency"))
    u8, u32, u64 = run, run.cast("I"), run.cast("Q")
    fd, uffd, lo, qword_end, page_base, hva_base = (s[k] for k in ("vcpu_fd", "uffd", "lo", "qword_end", "page_base",
                                                                   "hva_base"))
    ER, ML, MA, MW, MD, MMIO, KVM_RUN, DEMAND = (s[k] for k in ("ER", "ML", "MA", "MW", "MD", "MMIO", "KVM_RUN",
                                                                "DEMAND"))
    UFFDIO_COPY, log_cap, nice, windows = s["UFFDIO_COPY"], s["log_cap"], s["nice"], s["windows"]
    tid = threading.get_native_id()
    f = fetcher(s, sh)
    image = f.image if f is not None else 0  # a local image's page: no call
    zero, counters, MADE = zero_map(s, sh), counters_view(sh), Shared.made.offset // 8
    wide, page_end = first_window(s, sh, f), s["page_base"] + (s["ram_bytes"] >> 12)
    READAHEAD, MADE_RA = s["READAHEAD"], Shared.made_readahead.offset // 8
    known = sh.zero_known or s["base"] == 1  # else the source's zero map may come while in the loop
    copy, cq = copy_arg(s)
    ioctl = fcntl.ioctl
    logged = 0
    next_expected = sh.next_expected
    try:
        while True:
            try:
                ioctl(fd, KVM_RUN)
                ret = 0
            except OSError as e:
                ret = -e.errno
            if not ret and u32[ER] == MMIO and u32[ML] == 8:
                t0 = monotonic_ns()
                offset = u64[MA] - lo
                if not offset & 7 and 0 <= offset < qword_end:
                    page = page_base + (offset >> 12)
                    if state[page] != PRESENT:
                        if not known and sh.zero_known:  # it came: zero pages are made, windows widen
                            zero, wide, known = zero_map(s, sh), first_window(s, sh, f), True
                        if (f is None or zero[page >> 3] >> (page & 7) & 1
                                or windows and (state[page] or page == next_expected)):  # IN_FLIGHT, or a scan
                            sh.status, sh.ret = EXIT, ret
                            return EXIT  # the thread's own path makes a zero page, or fetches
                        n = window_pages(page, wide, page_end, state, zero) if wide > 1 else 1
                        next_expected = page + n  # where a scan would fault next
                        first = offset & ~4095
                        # The fetch is the transfer's most urgent work: at the thread's own
                        # priority where the guest runs niced (VcpuThread.guest_nice).
                        urgent = nice[0] and nice_urgent(nice, tid)
                        if image:
                            src = image + lo + first
                        else:
                            try:
                                src = f.page(lo + first) if n == 1 else f.window(lo + first, n)
                            except Handback as h:
                                next_expected = page + 1  # the other side fetches this page alone
                                return _fetch(sh, page, offset, t0, h.received, h.error, urgent)
                        cq[0], cq[1], cq[4] = hva_base + first, src, 0
                        try:
                            ioctl(uffd, UFFDIO_COPY, copy, True)
                        except OSError as e:
                            if e.errno != errno.EEXIST:  # the other side installs it again and says why
                                return _fetch(sh, page, offset, t0, TOTAL if not image else 0, 0, urgent)
                        else:  # created here: counted here (pages.PageTracker.mark_created)
                            state[page] = PRESENT
                            arrival[page] = DEMAND
                            counters[MADE] += 1
                        if n > 1:
                            install_behind(page, n, hva_base + first, src, f.stride, copy, cq, uffd, UFFDIO_COPY, state,
                                           arrival, READAHEAD, counters, MADE, MADE_RA)
                        if urgent:
                            nice_relax(nice, tid)
                    if u8[MW]:
                        ram[offset >> 3] = u64[MD]
                    else:
                        u64[MD] = ram[offset >> 3]
                    log_t[logged] = t0
                    log_latency[logged] = monotonic_ns() - t0
                    logged += 1
                    if logged == log_cap:
                        sh.status = FLUSH
                        return FLUSH
                    continue
            sh.status, sh.ret = EXIT, ret
            return EXIT
    finally:
        leave(sh, logged, f, next_expected)


def leave(sh: Shared, logged: int, f: Fetcher | None, next_expected: int) -> None:
    """What a loop hands back on every return: its records, the requests it sent, and where
    its last window ended."""
    sh.logged, sh.requests, sh.next_expected = logged, f.requests if f is not None else 0, next_expected


def first_window(s: dict[str, Any], sh: Shared, f: Fetcher | None) -> int:
    """The pages a fault that starts no scan asks for: the readahead's base, once the source's
    zero map has come (before it, a window could hold a zero page, whose answer is not in the
    fixed layout), within what the receive buffer holds; else one."""
    return min(s["base"], f.most) if f is not None and sh.zero_known else 1


def window_pages(page: int, wide: int, end: int, state: memoryview, zero: memoryview | bytes) -> int:
    """A first window at the faulting ``page``: it and the MISSING data pages right after it,
    up to ``wide`` pages and not from ``end`` on."""
    n = 1
    while n < wide and page + n < end and not state[page + n] and not zero[page + n >> 3] >> (page + n & 7) & 1:
        n += 1
    return n


def install_behind(page: int, npages: int, hva: int, src: int, stride: int, copy: bytearray, cq: memoryview,
                   uffd: int, UFFDIO_COPY: int, state: memoryview, arrival: memoryview, how: int,
                   counters: memoryview, MADE: int, MADE_RA: int) -> None:
    """The pages behind a faulting ``page`` in its window (its own is installed), one
    UFFDIO_COPY each from their answers: a page another thread installed first (EEXIST) is
    its maker's, and one that fails otherwise stays MISSING, asked for again when it is
    touched or by the background transfer."""
    for i in range(1, npages):
        cq[0], cq[1], cq[4] = hva + (i << 12), src + i * stride, 0
        try:
            fcntl.ioctl(uffd, UFFDIO_COPY, copy, True)
        except OSError:
            continue
        state[page + i] = PRESENT
        arrival[page + i] = how
        counters[MADE] += 1
        counters[MADE_RA] += 1


def zero_map(s: dict[str, Any], sh: Shared) -> memoryview | bytes:
    """The tracker's zero map as this entry found it (all data pages where it has none yet)."""
    npages = s["npages"]
    return view(sh.zero, sh.zero_len) if sh.zero_len * 8 >= npages else bytes(npages // 8 + 1)


def counters_view(sh: Shared) -> memoryview:
    """``sh`` as int64s: an item store is cheaper than a field's (``made``, per fault)."""
    return view(ctypes.addressof(sh), ctypes.sizeof(sh), "q")


def copy_arg(s: dict[str, Any]) -> tuple[bytearray, memoryview]:
    """A one-page struct uffdio_copy (dst, src, len, mode, copy) in the installer's mode."""
    copy = bytearray(40)
    cq = memoryview(copy).cast("Q")
    cq[2], cq[3] = 4096, s["copy_mode"]
    return copy, cq


def _fetch(sh: Shared, page: int, offset: int, t0: int, received: int, error: int, urgent: bool) -> int:
    sh.status, sh.page, sh.offset, sh.t0, sh.received, sh.error = FETCH, page, offset, t0, received, error
    sh.urgent = bool(urgent)
    return FETCH

