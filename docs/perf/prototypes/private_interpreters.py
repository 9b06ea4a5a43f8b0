"""Prototype, not product: exit mode's fault loop with a GIL per vCPU thread on Python 3.11.

Each vCPU thread runs its KVM_RUN loop in a CPython of its own: a second copy of libpython
loaded with dlmopen(LM_ID_NEWLM), so that the two vCPU threads of a 2-vCPU guest do not hand
one GIL back and forth at every ioctl. The private interpreter shares nothing with this one but
memory: it reaches kvm_run, guest RAM, the page tracker's state and arrival bytes, the page
image or the connection's receive buffer by address, and the fds by number. It takes the
fast path only (an MMIO exit for an aligned qword in RAM, the page fetched one at a time) and
hands every other exit back to the vCPU thread's own handling, in this interpreter.

Not in the product because (docs/performance.md, "A GIL per vCPU thread"): the tracker's count
and all_present, the fault log, the retry path and a partly read answer would each need a way
across the two interpreters; every private interpreter costs ~14 MiB of RSS; and a copy of
libc in a second link-map namespace needs the care below.

Run from the repository root, nothing else running:
    python docs/perf/prototypes/private_interpreters.py pagein --mem 32 --rounds 10 --vcpus 1,2
    python docs/perf/prototypes/private_interpreters.py fetch --mem 64 --rounds 8 --vcpus 2
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import statistics
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

from postcopy.bench import fault_vm, limit, pagein  # noqa: E402
from postcopy.bench.common import source_process  # noqa: E402
from postcopy.bench.source import LocalPageConnection, SourceImage  # noqa: E402
from postcopy.destination.classic_mode import place_vcpus  # noqa: E402
from postcopy.destination.exit_mode import ExitModeResolver  # noqa: E402
from postcopy.destination.install import Installer  # noqa: E402
from postcopy.destination.migration import SWITCH_INTERVAL_S  # noqa: E402
from postcopy.destination.pages import Arrival, PageTracker  # noqa: E402
from vmm import kvm as vk  # noqa: E402
from vmm.abi import kvm as kvm_abi  # noqa: E402
from vmm.abi import userfaultfd as uffd_abi  # noqa: E402
from vmm.guest import touch  # noqa: E402
from vmm.guest.layout import DATA_GPA, PAGE_SIZE  # noqa: E402
from vmm.memory import GuestMemory  # noqa: E402
from vmm.uffd import Uffd  # noqa: E402
from vmm.vcpu import KVM_EXIT_MMIO, VcpuState, VcpuThread  # noqa: E402

_dl = ctypes.CDLL(None)
_dl.dlmopen.restype, _dl.dlmopen.argtypes = ctypes.c_void_p, [ctypes.c_long, ctypes.c_char_p, ctypes.c_int]
_dl.dlsym.restype, _dl.dlsym.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
_dl.dlerror.restype = ctypes.c_char_p
_dl.pthread_key_create.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
LM_ID_NEWLM, RTLD_NOW = -1, 2
LIBPYTHON = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")


def _new_key(create: Callable[[Any, Any], int]) -> int:
    key = ctypes.c_uint()
    if create(ctypes.byref(key), None):
        raise OSError("pthread_key_create failed")
    return key.value


# Every libc copy hands out pthread keys from index 0, but they all index one per-thread array
# (struct pthread's, found through %fs): this interpreter's keys and a private one's would name
# the same slots, and each would read the other's thread state. So this libc holds the indexes
# up to RESERVED, never written, and each private libc burns the indexes this one used before,
# so that its own keys land in the reserved range.
RESERVED = 24
_FIRST_FREE = _new_key(_dl.pthread_key_create)
while _new_key(_dl.pthread_key_create) < RESERVED - 1:
    pass

# The private interpreter's side: a fault loop over addresses and fds only.
INNER = r'''
import sys
sys.path[:0] = %r
import ctypes, errno, fcntl, os, socket
from array import array
from time import monotonic_ns
from postcopy.fastframes import demand_frame, ONE_PAGE_FRAME_HEAD as HEAD, ONE_PAGE_FRAME_BYTES as TOTAL
from proto.fastpath import one_page_ok, ONE_PAGE_DATA_AT
from vmm.abi.userfaultfd import UFFDIO_COPY, UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_ZEROPAGE, UFFDIO_ZEROPAGE_MODE_DONTWAKE

def view(addr, n, fmt="B"):
    return memoryview((ctypes.c_char * n).from_address(addr)).cast("B").cast(fmt)

def setup(a):
    global S
    run8 = view(a["run"], a["run_size"])
    S = dict(a, u8=run8, u32=run8.cast("I"), u64=run8.cast("Q"), ram=view(a["hva_base"], a["ram_bytes"], "Q"),
             state=view(a["state"], a["npages"]), arrival=view(a["arrival"], a["npages"]),
             zero=view(a["zero"], a["zero_len"]), slot=view(a["slot"], 16, "q"),
             sock=socket.socket(fileno=os.dup(a["sock_fd"])) if a["sock_fd"] >= 0 else None,
             rbuf=view(a["buf"], a["buf_len"]) if a["buf_len"] else None, latency=array("Q"))

def loop():
    """KVM_RUN until an exit the fast path does not take: its return value in slot[0]."""
    s = S
    u8, u32, u64, ram, state, arrival, zero, slot = (s[k] for k in ("u8", "u32", "u64", "ram", "state", "arrival", "zero", "slot"))
    fd, ufd, lo, qword_end, page_base, hva_base, image = (s[k] for k in ("vcpu_fd", "uffd", "lo", "qword_end", "page_base", "hva_base", "image"))
    ER, ML, MA, MW, MD, MMIO, KVM_RUN = (s[k] for k in ("ER", "ML", "MA", "MW", "MD", "MMIO", "KVM_RUN"))
    sock, rbuf = s["sock"], s["rbuf"]
    if sock is not None:
        sendall, recv_into, data_at, hl = sock.sendall, sock.recv_into, s["buf"] + len(HEAD) + ONE_PAGE_DATA_AT, len(HEAD)
        keys, ki = os.urandom(4096), 0
    copy = bytearray(40); cq = memoryview(copy).cast("Q"); cq[2], cq[3] = 4096, UFFDIO_COPY_MODE_DONTWAKE
    zp = bytearray(32); zq = memoryview(zp).cast("Q"); zq[1], zq[2] = 4096, UFFDIO_ZEROPAGE_MODE_DONTWAKE
    ioctl, log = fcntl.ioctl, s["latency"].append
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
                if state[page] != 1:
                    if zero[page >> 3] >> (page & 7) & 1:
                        break  # a zero-map page: the vCPU thread's own path makes it
                    first = offset & ~4095
                    if sock is None:
                        src = image + lo + first
                    else:
                        sendall(demand_frame(lo + first, keys[ki:ki + 4]))
                        ki = (ki + 4) & 4095
                        n = recv_into(rbuf)
                        if n == TOTAL and rbuf[:hl] == HEAD and one_page_ok(rbuf, hl, lo + first):
                            src = data_at
                        elif n < 80 and bytes(rbuf[:n]).find(b"\xa4zero\xc4\x01\x01") > 0:
                            src = 0  # the source found the page zero: its answer carries no data
                        else:
                            raise RuntimeError(f"an answer the prototype does not take: {n} bytes")
                    try:
                        if src:
                            cq[0], cq[1], cq[4] = hva_base + first, src, 0
                            ioctl(ufd, UFFDIO_COPY, copy, True)
                        else:
                            zq[0], zq[3] = hva_base + first, 0
                            ioctl(ufd, UFFDIO_ZEROPAGE, zp, True)
                    except OSError as e:
                        if e.errno != errno.EEXIST:
                            raise
                    state[page] = 1
                    arrival[page] = 2
                    slot[1] += 1
                if u8[MW]:
                    ram[offset >> 3] = u64[MD]
                else:
                    u64[MD] = ram[offset >> 3]
                log(monotonic_ns() - t0)
                continue
        break
    slot[0] = ret

def latencies(addr, cap):
    lat = S["latency"]
    n = min(cap, len(lat))
    ctypes.memmove(addr, lat.buffer_info()[0], n * 8)
    S["slot"][1] = n
    if S["sock"] is not None:
        S["sock"].close()  # its dup only
'''


class PrivateInterpreter:
    """A CPython of its own in this process (a dlmopen'ed libpython, with its own libc)."""

    def __init__(self) -> None:
        made: list[BaseException | None] = []
        # Made on a thread of its own: two private interpreters' keys share indexes, so no
        # thread may hold the thread state of two (each thread here runs one).
        t = threading.Thread(target=lambda: made.append(self._load()))
        t.start()
        t.join()
        if made[0] is not None:
            raise made[0]

    def _load(self) -> BaseException | None:
        try:
            handle = _dl.dlmopen(LM_ID_NEWLM, LIBPYTHON.encode(), RTLD_NOW)
            if not handle:
                raise OSError(f"dlmopen({LIBPYTHON}): {(_dl.dlerror() or b'').decode()}")

            def fn(name: bytes, restype: Any, *argtypes: Any) -> Any:
                address = _dl.dlsym(handle, name)
                if not address:
                    raise OSError(f"{name.decode()} not in the private libpython's namespace")
                return ctypes.CFUNCTYPE(restype, *argtypes)(address)
            create = fn(b"pthread_key_create", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
            while _new_key(create) < _FIRST_FREE:
                pass
            # The private libc set up its thread-local ctype tables only on threads it started.
            self._ctype_init = fn(b"__ctype_init", None)
            self._ctype_init()
            fn(b"Py_InitializeEx", None, ctypes.c_int)(0)  # 0: no signal handlers
            self._run = fn(b"PyRun_SimpleString", ctypes.c_int, ctypes.c_char_p)
            self._ensure = fn(b"PyGILState_Ensure", ctypes.c_int)
            self._release = fn(b"PyGILState_Release", None, ctypes.c_int)
            if self._run((INNER % (sys.path,)).encode()):
                raise RuntimeError("the private interpreter could not load its fault loop")
            fn(b"PyEval_SaveThread", ctypes.c_void_p)()  # its GIL goes to the vCPU threads
            return None
        except BaseException as e:  # noqa: BLE001 (handed to the thread that asked)
            return e

    def run(self, code: str) -> None:
        """``code`` in the private interpreter, on the calling thread, under its own GIL."""
        self._ctype_init()
        gil = self._ensure()
        try:
            failed = self._run(code.encode())
        finally:
            self._release(gil)
        if failed:
            raise RuntimeError(f"private interpreter: {code[:60]!r} failed (its traceback is on stderr)")


POOL: list[PrivateInterpreter] = []  # kept for the process: a namespace is never unloaded


def interpreters(n: int) -> list[PrivateInterpreter]:
    while len(POOL) < n:
        POOL.append(PrivateInterpreter())
    return POOL[:n]


def attach(thread: VcpuThread, resolver: ExitModeResolver, interp: PrivateInterpreter, *, image: int = 0,
           sock_fd: int = -1, buf: int = 0, buf_len: int = 0, latency: list[int]) -> None:
    """Run ``thread``'s fault loop in ``interp``: the fast path there, every other exit here."""
    st = thread.fault_state
    lo, qword_end, _ = st.decoder.qword_span()  # type: ignore[attr-defined]
    tracker = resolver.tracker
    zero = bytearray(tracker.zero_bitmap)  # kept alive by the closure below
    slot = (ctypes.c_int64 * 2)()
    vcpu = thread.vcpu
    args = dict(run=ctypes.addressof(ctypes.c_char.from_buffer(vcpu._run_map)), run_size=len(vcpu._run_map),
                vcpu_fd=vcpu.fd, uffd=resolver.installer.uffd.fd, lo=lo, qword_end=qword_end,
                ram_bytes=(qword_end + 7) & ~7, page_base=st.decoder.page_base, hva_base=st.decoder.hva_base,  # type: ignore[attr-defined]
                state=ctypes.addressof((ctypes.c_char * tracker.npages).from_buffer(tracker.state)),
                arrival=ctypes.addressof((ctypes.c_char * tracker.npages).from_buffer(tracker.arrival)),
                npages=tracker.npages, zero=ctypes.addressof((ctypes.c_char * len(zero)).from_buffer(zero)),
                zero_len=len(zero), slot=ctypes.addressof(slot), image=image, sock_fd=sock_fd, buf=buf, buf_len=buf_len,
                KVM_RUN=kvm_abi.KVM_RUN, MMIO=KVM_EXIT_MMIO, ER=vk.EXIT_REASON_U32, ML=vk.MMIO_LEN_U32,
                MA=vk.MMIO_PHYS_ADDR_U64, MW=vk.MMIO_IS_WRITE_U8, MD=vk.MMIO_DATA_U64)

    def run_loop(_keep: bytearray = zero) -> VcpuState:  # (zero's address is in args)
        interp.run(f"setup({args!r})")
        try:
            while True:
                interp.run("loop()")
                final = thread.handle_exit(int(slot[0]))
                if final is not None:
                    return final
        finally:
            out = (ctypes.c_uint64 * (1 << 20))()
            interp.run(f"latencies({ctypes.addressof(out)}, {len(out)})")
            latency.extend(out[:slot[1]])
    thread.run_loop = run_loop


def pagein_private(image: SourceImage, vcpus: int) -> float:
    """pagein.run_python's exit mode with the fault loops in private interpreters; pages/s."""
    size = image.size
    memory = GuestMemory.create(size, "anon", "bench-pagein")
    machine = pagein.boot(size, vcpus, memory)
    uffd = Uffd(uffd_abi.UFFD_FEATURE_SIGBUS)
    resolver: ExitModeResolver | None = None
    try:
        for region in memory.regions:
            uffd.register(region.hva, region.size)
        tracker = PageTracker(memory)
        tracker.mark_present(0, DATA_GPA // PAGE_SIZE, Arrival.EAGER)
        place_vcpus(machine.vcpus)
        resolver = ExitModeResolver(Installer(uffd, memory, tracker, wake=False), readahead_base=1, readahead_max=1)
        for thread, interp in zip(machine.vcpus, interpreters(vcpus)):
            resolver.prepare(thread, LocalPageConnection(image))  # type: ignore[arg-type]
            attach(thread, resolver, interp, image=image.address, latency=[])
        t0 = time.monotonic_ns()
        machine.start()
        pagein._wait(machine, None, f"private interpreters, {vcpus} vCPUs")
        seconds = (max(p.done_ns for p in machine.services.progress) - t0) / 1e9
        machine.check()
        progress = machine.services.progress
        if sum(p.done_pages for p in progress) != pagein.data_pages(size) or sum(p.done_errors for p in progress):
            raise RuntimeError("the guest did not visit every page, or found one wrong")
        firsts = memory.view(DATA_GPA, size - DATA_GPA).cast("Q")[::PAGE_SIZE // 8]
        if firsts.tolist() != [touch.check_written(g) for g in range(DATA_GPA, size, PAGE_SIZE)]:
            raise RuntimeError("guest RAM does not hold what the guest wrote")
        return pagein.data_pages(size) / seconds
    finally:
        if resolver is not None:
            resolver.close()
        machine.close()
        uffd.close()


def fetch_private(header: Any, zero_bitmap: bytes, url: str, token: str, vcpus: int) -> fault_vm.ScanResult:
    """fault_vm.scan (one page a fault, over the page server) with private fault loops."""
    latency: list[int] = []
    pool = interpreters(vcpus)
    original = ExitModeResolver.prepare

    def prepare(self: ExitModeResolver, thread: VcpuThread, connection: Any, prefetch: Any = None) -> None:
        original(self, thread, connection, prefetch)
        ws = connection._conn.ws
        attach(thread, self, pool[thread.id], sock_fd=ws.sock.fileno(), buf=ws.buffer_address,
               buf_len=len(ws.buffer), latency=latency)
    ExitModeResolver.prepare = prepare  # type: ignore[method-assign]
    try:
        result = fault_vm.scan(header, zero_bitmap, url, token, vcpus, readahead_base=1, readahead_max=1)
    finally:
        ExitModeResolver.prepare = original  # type: ignore[method-assign]
    result.latency_ns = latency + result.latency_ns  # the private loops' faults, then any taken here
    return result


def _pct(xs: list[int], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("pagein", "fetch"))
    ap.add_argument("--mem", type=int, default=32, help="guest MiB")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--vcpus", default="1,2")
    a = ap.parse_args()
    vcounts = [int(v) for v in a.vcpus.split(",")]
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # as the destination runs
    if a.what == "pagein":
        image = SourceImage(a.mem << 20)
        c = limit.Limit.build()
        dumps = {v: limit.dump_guest(image.size, v) for v in vcounts}
        runs: dict[int, dict[str, Callable[[], float]]] = {v: {
            "private": lambda v=v: pagein_private(image, v),
            "exit": lambda v=v: pagein.run_python(image, "exit", v),
            "C": lambda v=v: c.run(dumps[v], "exit")} for v in vcounts}
        rates: dict[int, dict[str, list[float]]] = {v: {k: [] for k in runs[v]} for v in vcounts}
        for v in vcounts:  # warm-up
            for f in runs[v].values():
                f()
        for r in range(a.rounds):
            for v in vcounts:
                for k, f in (list(runs[v].items())[::-1] if r % 2 else runs[v].items()):
                    rates[v][k].append(f())
            print(r, {v: {k: round(x[-1] / 1e3, 1) for k, x in d.items()} for v, d in rates.items()}, flush=True)
        for v in vcounts:
            d = rates[v]
            paired = {k: statistics.median(x / y for x, y in zip(d[k], d["C"])) for k in ("private", "exit")}
            print(f"{v} vCPU: private / C {paired['private']:.3f}, exit / C {paired['exit']:.3f}, private / exit "
                  f"{statistics.median(x / y for x, y in zip(d['private'], d['exit'])):.3f}; medians (k pages/s) "
                  + ", ".join(f"{k} {statistics.median(x) / 1e3:.1f}" for k, x in d.items()))
        for path in dumps.values():
            limit.remove_dump(path)
        return
    with source_process(a.mem << 20, 2, prefill=1.0) as source:
        header, zero_bitmap = asyncio.run(source.pause())
        for v in vcounts:
            scans = {"private": lambda: fetch_private(header, zero_bitmap, source.url, source.token, v),
                     "exit": lambda: fault_vm.scan(header, zero_bitmap, source.url, source.token, v,
                                                   readahead_base=1, readahead_max=1)}
            results: dict[str, list[fault_vm.ScanResult]] = {k: [] for k in scans}
            scans["private"]()  # warm-up
            for r in range(a.rounds):
                for k, f in (list(scans.items())[::-1] if r % 2 else scans.items()):
                    results[k].append(f())
                    x = results[k][-1]
                    print(r, k, f"p50 {_pct(x.latency_ns, 50):.1f} p99 {_pct(x.latency_ns, 99):.1f} us, "
                          f"{x.pages_s / 1e3:.1f} k pages/s, {len(x.latency_ns)} faults", flush=True)
            for k, xs in results.items():
                pooled = [ns for x in xs for ns in x.latency_ns]
                print(f"{v} vCPU {k}: pooled p50 {_pct(pooled, 50):.1f} us, p99 {_pct(pooled, 99):.1f} us; "
                      f"median {statistics.median(x.pages_s for x in xs) / 1e3:.1f} k pages/s")


if __name__ == "__main__":
    main()
