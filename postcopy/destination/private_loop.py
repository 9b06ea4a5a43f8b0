"""The fault loops with a GIL per thread: the destination's side.

Python 3.11 has one GIL per process. At 2 vCPUs, two threads that resolve their faults in
Python hand it to each other at every ioctl, and the page-in rate stays near three quarters of
what C reaches (docs/performance.md). So a vCPU's thread runs its KVM_RUN loop in a CPython
of its own (vmm.interp: a second libpython, loaded with dlmopen; the vCPUs pinned to one CPU,
which never run at once, share one), entered through a C
callback: the loop there (private_fault_loop.py) takes the usual fault, the fetch of its
first readahead window and the installs included, under its own GIL, and comes back here for
everything else. This side keeps the books: it flushes the loop's fault records into the
vCPU's FaultLog and its counts into the exit counts and the connection's, lets the tracker
count its pages (PageTracker.makers), finishes a fetch the loop could not (a partial or odd
answer, a broken socket: with the connection's retries and errors), and hands every other
exit to the vCPU thread's general handling.

Fault mode classic's placed handler threads get the same (PrivateHandler, with
private_handler_loop.py), so that the baseline is not held back by a shared GIL either.

Where a thread cannot have one (no glibc or shared libpython, TLS, RAM in several regions, all
MAX_INTERPRETERS in use, a loop that could not be set up there), it runs its shared loop (ExitModeResolver._run, ClassicHandler._main).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable
from array import array
from time import monotonic_ns
from typing import TYPE_CHECKING, Any, TypeVar

from postcopy.destination import private_fault_loop as inner
from postcopy.destination.client import FastSource
from postcopy.destination.pages import Arrival
from postcopy.destination.retry import NoLongerWanted
from postcopy.faults import MMIO, PAGE_MASK
from postcopy.observe.faultlog import U64, UFFD_KIND
from vmm import interp
from vmm import kvm as vk
from vmm.abi import kvm as kvm_abi
from vmm.abi import userfaultfd as uffd_abi
from vmm.vcpu import KVM_EXIT_MMIO, VcpuState, VcpuThread

if TYPE_CHECKING:
    from postcopy.destination.classic_mode import ClassicHandler, PageSource, _Handler
    from postcopy.destination.exit_mode import ExitModeResolver, VcpuFaultState
    from postcopy.destination.pages import PageTracker
    from postcopy.destination.readahead import Readahead
    from vmm.uffd import PageCopier

log = logging.getLogger("postcopy.destination")
LOG_RECORDS = 256  # fault records the loop keeps before it comes back to flush them
ERROR_BYTES = 16 * 1024
_ENTRY = ctypes.CFUNCTYPE(ctypes.c_int64)
_MMIO_KINDS = bytes([MMIO]) * LOG_RECORDS


def unavailable() -> str | None:
    """Why no vCPU here can have a private fault loop, or None."""
    if os.environ.get("POSTCOPY_PRIVATE_LOOPS", "1") == "0":
        return "turned off (POSTCOPY_PRIVATE_LOOPS=0)"
    return interp.unavailable()


def can_read(connection: object) -> bool:
    """Whether a loop in a private interpreter can fetch over ``connection`` itself (a plain
    socket, or a local image: its fast_source)."""
    fast_source = getattr(connection, "fast_source", None)
    return fast_source is not None and fast_source() is not None


P = TypeVar("P", bound="_Private")


def start(make: Callable[[interp.PrivateInterpreter], P], who: str, cpu: int | None) -> P | None:
    """``make`` with an interpreter from the pool, the one of the threads pinned to ``cpu``
    where it has one (interp.acquire), or None where none is free (said in the log: ``who``
    then runs its shared loop); the interpreter goes back if ``make`` fails."""
    try:
        private = interp.acquire(cpu)
    except interp.InterpreterUnavailable as e:
        log.info("%s serves its faults under the process's GIL: %s", who, e,
                 extra={"event": "private_loop_unavailable"})
        return None
    try:
        return make(private)
    except interp.PrivateInterpreterError as e:
        # The loop could not be set up there (its modules did not import, say): the shared loop
        # is correct, only slower, so the thread runs it, and the log says why.
        interp.release(private)
        log.warning("%s serves its faults under the process's GIL: its private loop could not be set up: %s",
                    who, _last_line(e), extra={"event": "private_loop_unavailable"})
        return None
    except BaseException:
        interp.release(private)
        raise


def _last_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def _search_path() -> list[str]:
    """This process's sys.path, after the directories its packages came from: an editable
    install finds them through an import hook, which a private interpreter does not run."""
    import postcopy
    import proto
    import vmm
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(m.__file__ or ""))) for m in (postcopy, proto, vmm)]
    return list(dict.fromkeys(roots + sys.path))


def _import_loop() -> str:
    """The code that makes the loop's module ``loop`` in a private interpreter's __main__."""
    return f"import sys\nsys.path[:] = {_search_path()!r}\nfrom postcopy.destination import private_fault_loop as loop"


def warm(threads: int) -> None:
    """Load the private interpreters that ``threads`` loops pinned round robin over this
    process's CPUs will use (one per CPU they take: interp.acquire) with the loop's module
    (~50 ms and ~40 ms each, the first time in a process), for ``PrivateLoop`` to find ready:
    a destination calls this on a worker thread before it prepares its vCPUs on its event
    loop's."""
    if unavailable() is not None:
        return
    held = []
    try:
        for _ in range(min(threads, len(os.sched_getaffinity(0)))):
            held.append(interp.acquire())
            held[-1].run(_import_loop())
    except interp.InterpreterUnavailable:
        pass  # fewer than n: the vCPUs without one run the shared loop
    finally:
        for private in held:
            interp.release(private)


class _Private:
    """What the two private loops' owners share: the exchange (``Shared``), the record and
    error buffers, the callback's slot, entering and leaving, and what the loop reads by
    address kept alive here (the zero map, the connection's buffer) while it may use it."""

    module = ""  # the loop's module in the private interpreter's __main__ (its setup, teardown)

    def __init__(self, private: interp.PrivateInterpreter, tracker: PageTracker, copier: PageCopier | None,
                 readahead: Readahead) -> None:
        self.interp, self.tracker, self.copier, self.readahead = private, tracker, copier, readahead
        self.shared = inner.Shared()
        self._t = array(U64, bytes(8 * LOG_RECORDS))
        self._latency = array(U64, bytes(8 * LOG_RECORDS))
        self._error = ctypes.create_string_buffer(ERROR_BYTES)
        self._entry_at = ctypes.c_uint64()
        self._entry = _ENTRY(0)
        self._zero: bytes | None = None
        self._source: FastSource | None = None
        self._made_seen = 0
        self._released = False
        self._set = False  # set up in the interpreter: torn down there before it goes back
        self._inside = False  # in the loop: the records it took since it was entered are not flushed yet
        self._flushes = 0  # returns whose records were flushed
        self.started = False  # entered: it gives the interpreter back when it ends

    def _common_args(self) -> dict[str, Any]:
        tracker = self.tracker
        return dict(shared=ctypes.addressof(self.shared), entry=ctypes.addressof(self._entry_at),
                    state=_address(tracker.state), arrival=_address(tracker.arrival), npages=tracker.npages,
                    log_t=self._t.buffer_info()[0], log_latency=self._latency.buffer_info()[0], log_cap=LOG_RECORDS,
                    error_text=ctypes.addressof(self._error), error_size=ERROR_BYTES,
                    UFFDIO_COPY=uffd_abi.UFFDIO_COPY, DEMAND=int(Arrival.DEMAND), READAHEAD=int(Arrival.READAHEAD),
                    base=self.readahead.base, windows=int(self.readahead.max > 1))

    def _set_up(self, args: dict[str, Any]) -> None:
        self.interp.run(f"{_import_loop()}\nimport postcopy.destination.{self.module} as {self.module}\n"
                        f"{self.module}.setup({args!r})")
        self._set = True
        self._entry = _ENTRY(self._entry_at.value)
        self.tracker.makers.append(self.shared)

    def _enter(self, connection: PageSource | None) -> int:
        """One entry: what may have changed since the last (the socket, after a reconnect; the
        zero map, where the last readahead window ended) handed over, the loop run, its records
        and counts taken back. Each fault the loop takes is a first window (the readahead's
        base), which ends where the next scan would start."""
        sh, readahead = self.shared, self.readahead
        sh.next_expected = readahead.next_expected
        source = self._source = connection.fast_source() if connection is not None else None
        if source is None:
            sh.fetch_here = 0
        else:
            sh.fetch_here = 1
            sh.sock_fd, sh.buffer, sh.buffer_len, sh.poll_ns, sh.image = source[:5]
        known = self.tracker.zero_map_known  # read before the map: set after it (PageTracker.set_zero_map)
        zero = self.tracker.zero_bitmap
        if zero is not self._zero or known != sh.zero_known:
            self._zero = zero
            sh.publish_zero_map(zero, known)
        status = self._entry()  # ctypes lets this interpreter's GIL go for the call
        if sh.next_expected != readahead.next_expected:
            readahead.next_expected, readahead.size, readahead.scanning = sh.next_expected, readahead.base, False
        if sh.requests:
            if connection is not None:
                connection.add_fast_requests(sh.requests)
            sh.requests = 0
        made = sh.made
        if made != self._made_seen:
            if self.copier is not None:
                self.copier.copied += made - self._made_seen
            self._made_seen = made
            self.tracker.check_complete()
        if status == inner.ERROR:
            raise interp.PrivateInterpreterError(f"the private fault loop failed:\n{self._error.value.decode()}")
        return status

    def _loop(self) -> Any:
        """Enter the loop, again and again, on the calling thread (which keeps a thread state
        of the private interpreter meanwhile), until ``_handle`` says the thread is done."""
        self._attach()
        try:
            while True:
                self._inside = True
                status = self._enter(self._connection())
                self._flush()
                self._inside = False
                self._flushes += 1
                done, value = self._handle(status)
                if done:
                    return value
        finally:
            self._inside = False
            self._detach()

    def flush_from_outside(self, kick: Callable[[], None], timeout: float) -> bool:
        """Have the records the loop holds flushed, from another thread: ``kick`` makes the loop
        return (it flushes at every return), and this waits until it has, or ``timeout`` (False).
        The loop returns only at a full buffer or an exit it does not take, so a vCPU that
        faults without one holds up to LOG_RECORDS faults that nothing has seen yet."""
        if not self._inside:
            return True
        flushes = self._flushes
        kick()
        deadline = time.monotonic() + timeout
        while self._inside and self._flushes == flushes:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0002)
        return True

    def _connection(self) -> PageSource | None:
        raise NotImplementedError

    def _flush(self) -> None:
        """The loop's records since the last entry, where this interpreter keeps them."""
        raise NotImplementedError

    def _handle(self, status: int) -> tuple[bool, Any]:
        """What the loop handed back: (True, the thread's result) when the thread is done."""
        raise NotImplementedError

    def _records(self, n: int) -> tuple[memoryview, memoryview]:
        return memoryview(self._t).cast("B")[:8 * n], memoryview(self._latency).cast("B")[:8 * n]

    def _attach(self) -> None:
        self.started = True
        self.interp.attach()

    def _detach(self) -> None:
        try:
            self._tear_down()
        finally:
            self.interp.detach()
            self.release()

    def _tear_down(self) -> None:
        """Drop the loop's state there (other threads' loops may go on in that interpreter)."""
        if self._set:
            self._set = False
            self.interp.run(f"{self.module}.teardown({ctypes.addressof(self.shared)})")

    def release(self) -> None:
        """Give the interpreter back (the thread is done with it, or never started)."""
        if not self._released:
            self._released = True
            try:
                self._tear_down()
            finally:
                interp.release(self.interp)


class PrivateLoop(_Private):
    """One vCPU's fault loop in a private interpreter (``run`` is the vCPU's run_loop)."""

    module = "private_fault_loop"

    def __init__(self, resolver: ExitModeResolver, thread: VcpuThread, state: VcpuFaultState,
                 private: interp.PrivateInterpreter) -> None:
        super().__init__(private, resolver.tracker, state.copier, state.readahead)
        self.resolver, self.thread, self.st = resolver, thread, state
        decoder, vcpu = state.decoder, thread.vcpu
        lo, qword_end, _ = decoder.qword_span()
        self._set_up(dict(
            self._common_args(),
            run=vcpu.run_address, run_size=len(vcpu.run_u8), vcpu_fd=vcpu.fd, uffd=resolver.installer.uffd.fd,
            copy_mode=resolver.installer.copy_mode, lo=lo, qword_end=qword_end, ram_bytes=qword_end + 7,
            page_base=decoder.page_base, hva_base=decoder.hva_base,
            nice_block=ctypes.addressof(thread.nice_block), nice_len=len(thread.nice_block),
            KVM_RUN=kvm_abi.KVM_RUN, MMIO=KVM_EXIT_MMIO, ER=vk.EXIT_REASON_U32, ML=vk.MMIO_LEN_U32,
            MA=vk.MMIO_PHYS_ADDR_U64, MW=vk.MMIO_IS_WRITE_U8, MD=vk.MMIO_DATA_U64))

    def run(self) -> VcpuState:
        """The vCPU's KVM_RUN loop (VcpuThread.run_loop), entered on its thread."""
        return self._loop()  # type: ignore[no-any-return]

    def _connection(self) -> PageSource | None:
        return self.st.connection

    def _handle(self, status: int) -> tuple[bool, Any]:
        if status == inner.EXIT:
            final = self.thread.handle_exit(self.shared.ret)
            return final is not None, final
        if status == inner.FETCH:
            self._finish_fetch()
        return False, None  # FLUSH: nothing more to do

    def _flush(self) -> None:
        """The loop's records since the last entry, into the vCPU's FaultLog and exit counts."""
        sh = self.shared
        n = sh.logged  # records, one per MMIO exit the loop took
        if n:
            faults = self.st.faults
            t_ns, latency_ns = self._records(n)
            faults.t_ns.frombytes(t_ns)
            faults.kind += _MMIO_KINDS[:n]
            faults.latency_ns.frombytes(latency_ns)  # last: readers see whole records
            counts = self.thread.exit_counts
            counts[KVM_EXIT_MMIO] = counts.get(KVM_EXIT_MMIO, 0) + n
            sh.logged = 0

    def _finish_fetch(self) -> None:
        """The fault the loop sent a request for and could not install: its answer read here,
        with the connection's retries and errors, installed, the access completed."""
        sh, st, resolver = self.shared, self.st, self.resolver
        offset, page, t0 = sh.offset, sh.page, sh.t0
        decoder = st.decoder
        first = offset & PAGE_MASK
        st.waiting_page = page
        try:
            data = st.connection.finish_page(decoder.qword_span()[0] + first, sh.received, sh.error)  # type: ignore[union-attr]
            resolver.installer.install_page(page, decoder.hva_base + first, data, Arrival.DEMAND, st.copier)  # type: ignore[arg-type]
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


class PrivateHandler(_Private):
    """One classic handler thread's loop in a private interpreter (private_handler_loop.py):
    ``run`` serves its uffd reads until the stop pipe says so."""

    module = "private_handler_loop"

    def __init__(self, classic: ClassicHandler, h: _Handler, private: interp.PrivateInterpreter) -> None:
        super().__init__(private, classic.tracker, h.copier, h.readahead)
        self.classic, self.h = classic, h
        self._tid = array(U64, bytes(8 * LOG_RECORDS))
        hva_lo, hva_hi, hva_page, hva_gpa = classic.hva_layout()
        self._set_up(dict(
            self._common_args(), uffd=classic.uffd.fd, stop_r=classic.stop_fd, copy_mode=classic.installer.copy_mode,
            msgs=_address(h.buf), msg_size=h.msg_size, log_tid=self._tid.buffer_info()[0],
            hva_lo=hva_lo, hva_hi=hva_hi, hva_page=hva_page, hva_gpa=hva_gpa))

    def run(self) -> None:
        """The handler thread's loop (ClassicHandler._main, after its placement)."""
        self._loop()

    def _connection(self) -> PageSource | None:
        return self.h.connection

    def _handle(self, status: int) -> tuple[bool, Any]:
        if status == inner.STOP:
            return True, None
        if status == inner.SERVE:
            self.classic._serve(self.h, self.shared.t0)
        elif status == inner.FETCH:
            self._finish_fetch()
        return False, None

    def _flush(self) -> None:
        """The loop's records since the last entry, into each faulting vCPU's log."""
        sh = self.shared
        n = sh.logged
        if n:
            classic, h = self.classic, self.h
            h.faults += n
            for t0, latency, tid in zip(self._t[:n], self._latency[:n], self._tid[:n]):
                classic._log_of(h, tid).record(t0, UFFD_KIND, latency)
            sh.logged = 0

    def _finish_fetch(self) -> None:
        """As PrivateLoop's: the page read here with the retries, installed (with its wake-up)."""
        sh, classic, h = self.shared, self.classic, self.h
        hva, t0 = sh.hva, sh.t0
        data = h.connection.finish_page(hva + classic.hva_layout()[3], sh.received, sh.error)  # type: ignore[union-attr]
        classic.installer.install_page(sh.page, hva, data, Arrival.DEMAND, h.copier)  # type: ignore[arg-type]
        h.faults += 1
        classic._log_of(h, h.fault_tid()).record(t0, UFFD_KIND, monotonic_ns() - t0)


def _address(buffer: bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))
