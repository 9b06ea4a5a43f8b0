"""Fault mode classic's handler loop as a handler thread runs it inside its private interpreter.

The classic handler threads (classic_mode.py), one per CPU the vCPUs use, share one GIL as exit
mode's vCPU threads did: at 2 vCPUs each fault's read, fetch and copy wait for the other
handler's hold. So a handler thread runs this loop in a CPython of
its own (vmm.interp), as exit mode's vCPUs run private_fault_loop.loop: it polls the uffd,
reads one message (as the shared loop does: classic_mode.MSG_SIZE), fetches the page with its
first window (private_fault_loop.Fetcher, as that loop sizes it), installs it with UFFDIO_COPY
(which wakes the vCPU), the rest of the window behind it, and records the fault against the
faulting thread. It comes back to its thread's own interpreter
(private_loop.PrivateHandler) for the rest:
- SERVE: a message the loop does not take (a page in flight or present, a zero page, a scan's
  fault where the handler has readahead windows, another event): it is in the message buffer,
  for ClassicHandler._serve;
- FETCH: as private_fault_loop's, for the page at ``hva``;
- FLUSH: the fault records are full; STOP: the stop pipe is readable.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
from time import monotonic_ns
from typing import Any

from postcopy.destination.private_fault_loop import (ERROR, FETCH, FLUSH, PRESENT, SERVE, STOP, Handback, Shared,
                                                     bind, copy_arg, counters_view, export, fetcher, first_window,
                                                     install_behind, leave, teardown, view, window_pages,
                                                     zero_map)
from postcopy.fastframes import ONE_PAGE_FRAME_BYTES as TOTAL

__all__ = ["ERROR", "handler_loop", "setup", "teardown"]

MISSING = 0  # postcopy.destination.pages.MISSING
UFFD_EVENT_PAGEFAULT = 0x12  # vmm.abi.userfaultfd
PAGE_MASK = ~4095


def setup(a: dict[str, Any]) -> None:
    """Bind the handler's memory (``a``: addresses, sizes, fds and constants) and export
    ``handler_loop``."""
    poller = select.poll()
    poller.register(a["uffd"], select.POLLIN)
    poller.register(a["stop_r"], select.POLLIN)
    s = bind(a, msgs=view(a["msgs"], a["msg_size"]), msg_q=view(a["msgs"], a["msg_size"], "Q"),
             log_tid=view(a["log_tid"], 8 * a["log_cap"], "Q"), poll=poller.poll)
    export(s, handler_loop)


def handler_loop(s: dict[str, Any]) -> int:
    """Serve one-message reads until something else comes; the status (Shared says what it left)."""
    sh: Shared = s["shared"]
    state, arrival, msgs, q = s["state"], s["arrival"], s["msgs"], s["msg_q"]
    log_t, log_latency, log_tid, log_cap = s["log_t"], s["log_latency"], s["log_tid"], s["log_cap"]
    uffd, stop_r, poll = s["uffd"], s["stop_r"], s["poll"]
    hva_lo, hva_hi, hva_page, hva_gpa = s["hva_lo"], s["hva_hi"], s["hva_page"], s["hva_gpa"]
    UFFDIO_COPY, DEMAND, windows = s["UFFDIO_COPY"], s["DEMAND"], s["windows"]
    f = fetcher(s, sh)
    zero, counters, MADE = zero_map(s, sh), counters_view(sh), Shared.made.offset // 8
    wide, page_end = first_window(s, sh, f), hva_page + (hva_hi >> 12)  # the page after the handler's memory
    READAHEAD, MADE_RA = s["READAHEAD"], Shared.made_readahead.offset // 8
    known = sh.zero_known or s["base"] == 1  # private_fault_loop.loop's
    copy, cq = copy_arg(s)
    ioctl, readv = fcntl.ioctl, os.readv
    logged = 0
    next_expected = sh.next_expected  # private_fault_loop.loop's: where the last window ended
    try:
        while True:
            for ready, _ in poll():
                if ready == stop_r:
                    sh.status = STOP
                    return STOP
            try:
                readv(uffd, [msgs])  # one whole message
            except BlockingIOError:
                continue  # another handler read it
            t0 = monotonic_ns()
            if f is not None:
                address = q[2]  # uffd_msg.pagefault.address
                if q[0] & 0xFF == UFFD_EVENT_PAGEFAULT and hva_lo <= address < hva_hi:
                    page = hva_page + (address >> 12)
                    if not known and sh.zero_known:
                        zero, wide, known = zero_map(s, sh), first_window(s, sh, f), True
                    if (state[page] == MISSING and not zero[page >> 3] >> (page & 7) & 1
                            and not (windows and page == next_expected)):
                        n = window_pages(page, wide, page_end, state, zero) if wide > 1 else 1
                        next_expected = page + n
                        hva = address & PAGE_MASK
                        try:
                            src = f.page(hva + hva_gpa) if n == 1 else f.window(hva + hva_gpa, n)
                        except Handback as h:
                            next_expected = page + 1  # the other side fetches this page alone
                            return _fetch(sh, page, hva, t0, h.received, h.error)
                        cq[0], cq[1], cq[4] = hva, src, 0
                        try:
                            ioctl(uffd, UFFDIO_COPY, copy, True)  # wakes the vCPU
                        except OSError as e:
                            if e.errno != errno.EEXIST:  # the other side installs it again and says why
                                return _fetch(sh, page, hva, t0, 0 if f.image else TOTAL, 0)
                        else:  # created here: counted here (pages.PageTracker.mark_created)
                            state[page] = PRESENT
                            arrival[page] = DEMAND
                            counters[MADE] += 1
                        if n > 1:  # their copies wake a vCPU that faulted on one meanwhile
                            install_behind(page, n, hva, src, f.stride, copy, cq, uffd, UFFDIO_COPY, state, arrival,
                                           READAHEAD, counters, MADE, MADE_RA)
                        # a record, and FLUSH when they are full: private_fault_loop.loop's, inlined
                        log_t[logged] = t0
                        log_tid[logged] = q[3] & 0xFFFFFFFF  # uffd_msg.pagefault.feat.ptid
                        log_latency[logged] = monotonic_ns() - t0
                        logged += 1
                        if logged == log_cap:
                            sh.status = FLUSH
                            return FLUSH
                        continue
            sh.status, sh.t0 = SERVE, t0
            return SERVE
    finally:
        leave(sh, logged, f, next_expected)


def _fetch(sh: Shared, page: int, hva: int, t0: int, received: int, error: int) -> int:
    sh.status, sh.page, sh.hva, sh.t0, sh.received, sh.error = FETCH, page, hva, t0, received, error
    return FETCH
