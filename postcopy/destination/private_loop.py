"""Exit mode's fault loop with a GIL per vCPU thread: the destination's side.

Python 3.11 has one GIL per process. At 2 vCPUs, two threads that resolve their faults in
Python hand it to each other at every ioctl, and the page-in rate stays near three quarters of
what C reaches (docs/performance.md). So where a vCPU takes one page a fault (no readahead),
its thread runs its KVM_RUN loop in a CPython of its own (vmm.interp: a second libpython,
loaded with dlmopen), entered through a C callback: the loop there (private_fault_loop.py)
takes the usual fault, fetch and install included, under its own GIL, and comes back here for
everything else. This side keeps the books: it flushes the loop's fault records into the
vCPU's FaultLog and its counts into the exit counts and the connection's, lets the tracker
count its pages (PageTracker.makers), finishes a fetch the loop could not (a partial or odd
answer, a broken socket: with the connection's retries and errors), and hands every other
exit to the vCPU thread's general handling.

Where a vCPU cannot have one (no glibc or shared libpython, TLS, RAM in several regions, all
MAX_INTERPRETERS in use), its thread runs ExitModeResolver._run as before.
"""
from __future__ import annotations

import ctypes
import os
import sys
from array import array
from time import monotonic_ns
from typing import TYPE_CHECKING

from postcopy.destination import private_fault_loop as inner
from postcopy.destination.client import FastSource
from postcopy.destination.pages import Arrival
from postcopy.destination.retry import NoLongerWanted
from postcopy.faults import MMIO, PAGE_MASK
from postcopy.observe.faultlog import U64
from vmm import interp
from vmm import kvm as vk
from vmm.abi import kvm as kvm_abi
from vmm.abi import userfaultfd as uffd_abi
from vmm.vcpu import KVM_EXIT_MMIO, VcpuState, VcpuThread

if TYPE_CHECKING:
    from postcopy.destination.exit_mode import ExitModeResolver, VcpuFaultState

LOG_RECORDS = 256  # fault records the loop keeps before it comes back to flush them
ERROR_BYTES = 16 * 1024
_ENTRY = ctypes.CFUNCTYPE(ctypes.c_int64)
_MMIO_KINDS = bytes([MMIO]) * LOG_RECORDS


def unavailable() -> str | None:
    """Why no vCPU here can have a private fault loop, or None."""
    if os.environ.get("POSTCOPY_PRIVATE_LOOPS", "1") == "0":
        return "turned off (POSTCOPY_PRIVATE_LOOPS=0)"
    return interp.unavailable()


def _import_loop() -> str:
    """The code that makes the loop's module ``loop`` in a private interpreter's __main__."""
    return f"import sys\nsys.path[:] = {sys.path!r}\nfrom postcopy.destination import private_fault_loop as loop"


def warm(n: int) -> None:
    """Load ``n`` private interpreters with the loop's module (~50 ms and ~40 ms each, the
    first time in a process), for ``PrivateLoop`` to find ready: a destination calls this on a
    worker thread before it prepares its vCPUs on its event loop's."""
    if unavailable() is not None:
        return
    held = []
    try:
        for _ in range(n):
            held.append(interp.acquire())
            held[-1].run(_import_loop())
    except interp.InterpreterUnavailable:
        pass  # fewer than n: the vCPUs without one run the shared loop
    finally:
        for private in held:
            interp.release(private)


class PrivateLoop:
    """One vCPU's fault loop in a private interpreter (``run`` is the vCPU's run_loop)."""

    def __init__(self, resolver: ExitModeResolver, thread: VcpuThread, state: VcpuFaultState,
                 private: interp.PrivateInterpreter) -> None:
        self.resolver, self.thread, self.st, self.interp = resolver, thread, state, private
        self.shared = inner.Shared()
        self._t = array(U64, bytes(8 * LOG_RECORDS))
        self._latency = array(U64, bytes(8 * LOG_RECORDS))
        self._error = ctypes.create_string_buffer(ERROR_BYTES)
        self._entry_at = ctypes.c_uint64()
        self._zero: bytes | None = None  # the zero map whose address the loop has (kept alive here)
        self._source: FastSource | None = None  # the same for the socket's buffer or the image
        self._made_seen = 0
        self._released = False
        self.started = False  # run() was entered: it gives the interpreter back when it ends
        tracker, decoder, vcpu = resolver.tracker, state.decoder, thread.vcpu
        lo, qword_end, _ = decoder.qword_span()
        args = dict(
            shared=ctypes.addressof(self.shared), entry=ctypes.addressof(self._entry_at),
            run=vcpu.run_address, run_size=len(vcpu.run_u8), vcpu_fd=vcpu.fd, uffd=resolver.installer.uffd.fd,
            copy_mode=resolver.installer.copy_mode, lo=lo, qword_end=qword_end, ram_bytes=qword_end + 7,
            page_base=decoder.page_base, hva_base=decoder.hva_base,
            state=_address(tracker.state), arrival=_address(tracker.arrival), npages=tracker.npages,
            log_t=self._t.buffer_info()[0], log_latency=self._latency.buffer_info()[0], log_cap=LOG_RECORDS,
            error_text=ctypes.addressof(self._error), error_size=ERROR_BYTES,
            nice_block=ctypes.addressof(thread.nice_block), nice_len=len(thread.nice_block),
            KVM_RUN=kvm_abi.KVM_RUN, MMIO=KVM_EXIT_MMIO, ER=vk.EXIT_REASON_U32, ML=vk.MMIO_LEN_U32,
            MA=vk.MMIO_PHYS_ADDR_U64, MW=vk.MMIO_IS_WRITE_U8, MD=vk.MMIO_DATA_U64,
            UFFDIO_COPY=uffd_abi.UFFDIO_COPY, DEMAND=int(Arrival.DEMAND))
        private.run(f"{_import_loop()}\nloop.setup({args!r})")
        self._entry = _ENTRY(self._entry_at.value)
        tracker.makers.append(self.shared)

    def run(self) -> VcpuState:
        """The vCPU's KVM_RUN loop (VcpuThread.run_loop), entered on its thread."""
        thread, sh = self.thread, self.shared
        handle, entry = thread.handle_exit, self._entry
        self.started = True
        self.interp.attach()
        try:
            while True:
                self._arm()
                status = entry()  # ctypes lets this interpreter's GIL go for the call
                self._flush()
                if status == inner.EXIT:
                    final = handle(sh.ret)
                    if final is not None:
                        return final
                elif status == inner.FETCH:
                    self._finish_fetch()
                elif status == inner.ERROR:
                    raise interp.PrivateInterpreterError(f"the private fault loop failed:\n{self._error.value.decode()}")
                # FLUSH: nothing more to do
        finally:
            try:
                self.interp.run("loop.teardown()")
            finally:
                self.interp.detach()
                self.release()

    def _arm(self) -> None:
        """What may change between entries: the socket (a reconnect), whether the loop may
        fetch at all, the zero map."""
        sh, st = self.shared, self.st
        source = self._source = st.connection.fast_source() if st.connection is not None else None
        if source is None:
            sh.fetch_here = 0
        else:
            sh.fetch_here = 1
            sh.sock_fd, sh.buffer, sh.buffer_len, sh.poll_ns, sh.image = source[:5]
        zero = self.resolver.tracker.zero_bitmap
        if zero is not self._zero:
            self._zero = zero
            sh.zero, sh.zero_len = ctypes.cast(ctypes.c_char_p(zero), ctypes.c_void_p).value or 0, len(zero)

    def _flush(self) -> None:
        """The loop's records and counts since the last entry, where this interpreter keeps them."""
        sh, st = self.shared, self.st
        n = sh.logged  # records, one per MMIO exit the loop took
        if n:
            faults = st.faults
            faults.t_ns.frombytes(memoryview(self._t).cast("B")[:8 * n])
            faults.kind += _MMIO_KINDS[:n]
            faults.latency_ns.frombytes(memoryview(self._latency).cast("B")[:8 * n])  # last: whole records
            counts = self.thread.exit_counts
            counts[KVM_EXIT_MMIO] = counts.get(KVM_EXIT_MMIO, 0) + n
            sh.logged = 0
        if sh.requests:
            if st.connection is not None:
                st.connection.add_fast_requests(sh.requests)
            sh.requests = 0
        made = sh.made
        if made != self._made_seen:
            if st.copier is not None:
                st.copier.copied += made - self._made_seen
            self._made_seen = made
            self.resolver.tracker.check_complete()

    def _finish_fetch(self) -> None:
        """The fault the loop sent a request for and could not install: its answer read here,
        with the connection's retries and errors, installed, the access completed."""
        sh, st, resolver = self.shared, self.st, self.resolver
        offset, page, t0 = sh.offset, sh.page, sh.t0
        decoder = st.decoder
        first = offset & PAGE_MASK
        st.waiting_page = page
        try:
            data = st.connection.finish_page(decoder.qword_span()[0] + first, sh.received, sh.error)
            resolver.installer.install_page(page, decoder.hva_base + first, data, Arrival.DEMAND, st.copier)
        except NoLongerWanted:
            pass  # as ExitModeResolver._resolve: the page came another way
        finally:
            guest_nice = self.thread.guest_nice
            if sh.urgent and guest_nice is not None:  # the loop made it urgent: relaxed as _resolve does
                guest_nice.relax()
        decoder.complete_qword(self.thread.vcpu, offset)
        st.faults.record(t0, MMIO, monotonic_ns() - t0)
        counts = self.thread.exit_counts
        counts[KVM_EXIT_MMIO] = counts.get(KVM_EXIT_MMIO, 0) + 1

    def release(self) -> None:
        """Give the interpreter back (the thread is done with it, or never started)."""
        if not self._released:
            self._released = True
            interp.release(self.interp)


def _address(buffer: bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))
