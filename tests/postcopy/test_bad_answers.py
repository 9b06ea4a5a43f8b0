"""The destination refuses every malformed or mismatched answer without installing anything:
a real page stream (aiohttp on loopback) answers with tampered frames, the real vCPU fault
path (exit mode's resolver: fetch, verify, install with UFFDIO_COPY into registered RAM) asks,
and the page stays missing, its readahead claim is given back, and nothing is copied."""
from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest
from aiohttp import web

from postcopy.destination.client import FetchError, SyncPageConnection, decode_batch
from postcopy.destination.exit_mode import ExitModeResolver, VcpuFaultState
from postcopy.destination.install import Installer, buffer_address
from postcopy.destination.pages import IN_FLIGHT, MISSING, Arrival, PageTracker
from postcopy.destination.prefetch import Prefetcher
from postcopy.destination.readahead import Readahead
from postcopy.destination.retry import RetryContext, RetryExhausted, RetryingSyncConnection, RetryPolicy
from postcopy.faults import FaultDecoder
from proto import PAGE_SIZE, PROTOCOL_VERSION, ErrorReply, PageBatch, PageRequest, build_page_batch
from vmm.abi.userfaultfd import UFFD_FEATURE_SIGBUS
from vmm.memory import GuestMemory
from vmm.uffd import Uffd, UffdError

pytestmark = pytest.mark.usefixtures("uffd_available")
GUEST = 1 << 20
TOKEN = "t"
SOURCE = bytes(random.Random(5).randbytes(GUEST))  # what the source holds: no zero pages
Tamper = Callable[[dict[str, Any]], Any]


def _answer(request: PageRequest) -> dict[str, Any]:
    good = build_page_batch(request.gpa, request.count, SOURCE[request.gpa:request.gpa + request.count * PAGE_SIZE])
    return msgpack.unpackb(good)


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x40]) + blob[at + 1:]


# Each tampering of the right answer, as the server sends it back.
TAMPERED: dict[str, Tamper] = {
    "wrong checksum (a flipped data byte)": lambda m: {**m, "data": _flip(m["data"], 5000)},
    "wrong checksum (a flipped sum bit)": lambda m: {**m, "sum": m["sum"] ^ (1 << 40)},
    "wrong length (a page short)": lambda m: {**m, "data": m["data"][:-PAGE_SIZE]},
    "wrong length (a byte long)": lambda m: {**m, "data": m["data"] + b"\0"},
    "wrong gpa": lambda m: {**m, "gpa": m["gpa"] + PAGE_SIZE},
    "wrong count": lambda m: {**m, "count": m["count"] - 1, "data": m["data"][:-PAGE_SIZE],
                              "zero": bytes(len(m["zero"]))},
    "unknown version": lambda m: {**m, "v": PROTOCOL_VERSION + 1},
    "unknown type": lambda m: {**m, "t": "page_batch2"},
    "unknown field": lambda m: {**m, "extra": 1},
    "zero bitmap marks a data page": lambda m: {**m, "zero": b"\x01" + m["zero"][1:]},
    "an error reply": lambda m: ErrorReply(500, "disk on fire").encode(),
    "garbage": lambda m: b"\xc1\xff\x00garbage",
    "truncated message": lambda m: msgpack.packb(m)[:-100],
    "a text frame": lambda m: "page_batch",
    "the socket closed": lambda m: None,
}


class TamperingServer:
    """A page stream on loopback that answers every request with ``tamper(right answer)``."""

    def __init__(self, tamper: Tamper) -> None:
        self.tamper = tamper
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for frame in ws:
            answer = self.tamper(_answer(PageRequest.decode(frame.data)))
            if answer is None:
                await ws.close()
            elif isinstance(answer, str):
                await ws.send_str(answer)
            else:
                await ws.send_bytes(answer if isinstance(answer, bytes) else msgpack.packb(answer))
        return ws

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/pages/ws", self._ws)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = "http://127.0.0.1:%d" % self._runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> TamperingServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def destination() -> Iterator[tuple[GuestMemory, Uffd, PageTracker, Installer]]:
    memory = GuestMemory.create(GUEST, "anon")
    uffd = Uffd(UFFD_FEATURE_SIGBUS)
    uffd.register(memory.regions[0].hva, GUEST)
    tracker = PageTracker(memory)
    try:
        yield memory, uffd, tracker, Installer(uffd, memory, tracker, wake=False)
    finally:
        uffd.close()
        memory.close()


def _vcpu(url: str, installer: Installer, base: int, most: int) -> tuple[RetryingSyncConnection, ExitModeResolver,
                                                                      VcpuFaultState]:
    """One exit-mode vCPU's fault path against ``url``: its connection (whose first failure is
    final: the tests look at it), the resolver, and its state with a readahead of ``base``..``most``."""
    ctx = RetryContext(RetryPolicy(deadline_s=0.0))
    conn = RetryingSyncConnection.open(lambda: SyncPageConnection(url, TOKEN, receive_timeout=5), ctx)
    resolver = ExitModeResolver(installer, readahead_base=base, readahead_max=most)
    state = VcpuFaultState(FaultDecoder(installer.memory), conn, Readahead(base, most))  # type: ignore[arg-type]
    return conn, resolver, state


@pytest.mark.parametrize("window", [1, 8])  # 1: the one-page fetch (fetch_page); 8: a readahead window
@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_bad_answer_installs_nothing_and_gives_back_the_claim(case: str, window: int, destination: Any) -> None:
    memory, uffd, tracker, installer = destination
    page = 16
    with TamperingServer(TAMPERED[case]) as server:
        conn, resolver, state = _vcpu(server.url, installer, window, window)
        try:
            with pytest.raises(RetryExhausted):
                resolver._resolve(state, page, page * PAGE_SIZE, memory.hva(page * PAGE_SIZE))
        finally:
            conn.close()
    assert installer.installed_bytes == 0 and tracker.present == 0
    assert all(tracker.state[p] == MISSING for p in range(page, page + window))  # the readahead claim came back
    # The page really is still missing: the right contents install in full now.
    assert uffd.copy(memory.hva(page * PAGE_SIZE), _buffer(SOURCE, page), PAGE_SIZE) == PAGE_SIZE
    assert memory.read(page * PAGE_SIZE, PAGE_SIZE) == SOURCE[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]


def _buffer(data: bytes, page: int) -> int:
    return buffer_address(data) + page * PAGE_SIZE


def test_the_right_answer_through_the_same_path_installs_the_source_pages(destination: Any) -> None:
    memory, uffd, tracker, installer = destination
    with TamperingServer(lambda m: m) as server:
        conn, resolver, state = _vcpu(server.url, installer, 8, 8)
        try:
            resolver._resolve(state, 16, 16 * PAGE_SIZE, memory.hva(16 * PAGE_SIZE))
        finally:
            conn.close()
    assert tracker.present == 8 and installer.installed_bytes == 8 * PAGE_SIZE
    assert memory.read(16 * PAGE_SIZE, 8 * PAGE_SIZE) == SOURCE[16 * PAGE_SIZE:24 * PAGE_SIZE]


def _prefetcher(url: str, installer: Installer, most: int, ahead: int) -> Prefetcher:
    ctx = RetryContext(RetryPolicy(deadline_s=0.0))
    conn = RetryingSyncConnection.open(lambda: SyncPageConnection(url, TOKEN, receive_timeout=5), ctx)
    return Prefetcher(installer, conn, window_max=most, ahead_pages=ahead)


def _settled(tracker: PageTracker, present: int) -> bool:
    deadline = time.monotonic() + 5
    while tracker.present < present or IN_FLIGHT in tracker.state:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return tracker.present == present


def test_a_scanning_vcpu_hands_the_windows_ahead_to_its_prefetcher(destination: Any) -> None:
    memory, uffd, tracker, installer = destination
    asked: list[Any] = []  # what the vCPU's own connection was asked for
    with TamperingServer(lambda m: (asked.append(m), m)[1]) as server, TamperingServer(lambda m: m) as ahead:
        conn, resolver, state = _vcpu(server.url, installer, 4, 16)
        state.prefetcher = _prefetcher(ahead.url, installer, 16, 32)
        try:
            resolver._resolve(state, 16, 16 * PAGE_SIZE, memory.hva(16 * PAGE_SIZE))  # not a scan yet: [16, 20)
            assert _settled(tracker, 4) and state.prefetcher.windows == 0
            resolver._resolve(state, 20, 20 * PAGE_SIZE, memory.hva(20 * PAGE_SIZE))  # a scan: [20, 28), then 32 ahead
            assert _settled(tracker, 12 + 32) and state.prefetcher.windows == 2  # [28, 44), [44, 60)
            # The guest outran it (faults where it stopped): still the scan, 16 here and 32 more ahead.
            resolver._resolve(state, 60, 60 * PAGE_SIZE, memory.hva(60 * PAGE_SIZE))
            assert _settled(tracker, 12 + 32 + 16 + 32) and state.prefetcher.windows == 4
            resolver._resolve(state, 200, 200 * PAGE_SIZE, memory.hva(200 * PAGE_SIZE))  # off the scan: base window
            assert _settled(tracker, 92 + 4) and state.prefetcher.windows == 4 and len(asked) == 4
            assert tracker.counts[Arrival.DEMAND] == 4 and tracker.counts[Arrival.READAHEAD] == 92
        finally:
            state.prefetcher.close()
            conn.close()
    for first, n in ((16, 92), (200, 4)):
        assert memory.read(first * PAGE_SIZE, n * PAGE_SIZE) == SOURCE[first * PAGE_SIZE:(first + n) * PAGE_SIZE]


def test_a_fault_on_a_window_in_flight_waits_for_the_prefetcher_and_fetches_nothing(destination: Any) -> None:
    memory, uffd, tracker, installer = destination
    asked: list[Any] = []
    gate = threading.Event()  # holds the prefetcher's answers
    with TamperingServer(lambda m: (asked.append(m), m)[1]) as server, \
            TamperingServer(lambda m: (gate.wait(10), m)[1]) as ahead:
        conn, resolver, state = _vcpu(server.url, installer, 4, 16)
        state.prefetcher = _prefetcher(ahead.url, installer, 16, 32)
        try:
            for page in (16, 20):  # a scan: [28, ...) goes to the prefetcher, whose answers wait at the gate
                resolver._resolve(state, page, page * PAGE_SIZE, memory.hva(page * PAGE_SIZE))
            deadline = time.monotonic() + 5
            while tracker.state[28] != IN_FLIGHT and time.monotonic() < deadline:  # claimed on its thread
                time.sleep(0.002)
            assert tracker.state[28] == IN_FLIGHT and len(asked) == 2
            fault = threading.Thread(target=resolver._resolve, args=(state, 28, 28 * PAGE_SIZE, memory.hva(28 * PAGE_SIZE)))
            fault.start()
            fault.join(0.2)
            assert fault.is_alive() and not tracker.is_present(28)  # waiting, not fetching it again
            gate.set()
            fault.join(5)
            assert not fault.is_alive() and tracker.is_present(28) and len(asked) == 2
            assert tracker.arrival[28] == Arrival.READAHEAD
        finally:
            gate.set()
            state.prefetcher.close()
            conn.close()
    assert IN_FLIGHT not in tracker.state
    assert memory.read(16 * PAGE_SIZE, 28 * PAGE_SIZE) == SOURCE[16 * PAGE_SIZE:44 * PAGE_SIZE]


def test_every_single_byte_flip_of_a_batch_is_refused_or_harmless() -> None:
    """Flip each byte of an encoded 2-page batch in turn (8 KiB+ of cases): the decoder either
    refuses it or, where the flip is in framing msgpack tolerates, yields exactly the source pages."""
    request = PageRequest(8 * PAGE_SIZE, 2, "demand")
    good = build_page_batch(request.gpa, 2, SOURCE[request.gpa:request.gpa + 2 * PAGE_SIZE])
    want = SOURCE[request.gpa:request.gpa + 2 * PAGE_SIZE]
    refused = 0
    for at in range(len(good)):
        try:
            batch = decode_batch(_flip(good, at), request)
        except FetchError:
            refused += 1
            continue
        assert isinstance(batch, PageBatch)
        assert b"".join(bytes(d) if d is not None else bytes(n * PAGE_SIZE) for _, n, d in batch.runs()) == want
    assert refused == len(good), f"{len(good) - refused} flips accepted"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "drop"]), st.integers(0, 10_000),
                          st.integers(1, 255)), min_size=1, max_size=4))
def test_any_mangling_of_a_batch_is_refused_or_yields_exactly_the_source_pages(edits: list[tuple[str, int, int]]) -> None:
    request = PageRequest(4 * PAGE_SIZE, 2, "readahead")
    frame = bytearray(build_page_batch(request.gpa, 2, SOURCE[request.gpa:request.gpa + 2 * PAGE_SIZE]))
    for what, at, value in edits:
        at %= max(len(frame), 1)
        if what == "flip" and frame:
            frame[at] ^= value
        elif what == "cut":
            del frame[at:]
        elif what == "insert":
            frame[at:at] = bytes([value])
        elif frame:
            del frame[at]
    try:
        batch = decode_batch(bytes(frame), request)
    except FetchError:
        return
    assert b"".join(bytes(d) if d is not None else bytes(n * PAGE_SIZE) for _, n, d in batch.runs()) == \
        SOURCE[request.gpa:request.gpa + 2 * PAGE_SIZE]


def test_a_fetch_that_lands_after_the_migration_completed_is_dropped_not_an_error(destination: Any) -> None:
    """A vCPU still retrying when the background brought the last page: RAM is unregistered by
    then (UFFDIO_COPY: ENOENT), and its batch is redundant."""
    memory, uffd, tracker, installer = destination
    late = decode_batch(build_page_batch(0, 2, SOURCE[:2 * PAGE_SIZE]), PageRequest(0, 2, "demand"))
    with pytest.raises(UffdError, match="ENOENT"):  # not complete: an error
        uffd.unregister(memory.regions[0].hva, GUEST)
        installer.install_batch(late, Arrival.DEMAND)
    uffd.register(memory.regions[0].hva, GUEST)
    installer.install_zero(0, memory.pages)  # the last page arrives
    assert tracker.all_present.is_set()
    uffd.unregister(memory.regions[0].hva, GUEST)
    installer.install_batch(late, Arrival.DEMAND)  # no error
    installer.install_zero(0, 1)
    assert tracker.counts[Arrival.DEMAND] == 0 and memory.read(0, PAGE_SIZE) == bytes(PAGE_SIZE)
