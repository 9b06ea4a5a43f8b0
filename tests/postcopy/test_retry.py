"""Retry and reconnect (postcopy/destination/retry.py) against a real page server on loopback
(serving known memory, no guest) behind the real fault-injection proxy."""
from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections.abc import Awaitable, Callable

import pytest

from postcopy.chaos import ChaosProxy, ChaosSchedule
from postcopy.destination.client import FetchError, SyncPageConnection
from postcopy.destination.retry import (
    FatalFetchError,
    NoLongerWanted,
    RetryContext,
    RetryExhausted,
    RetryingSyncConnection,
    RetryPolicy,
    retry_async,
)
from postcopy.source.page_server import PageServer
from proto import PAGE_SIZE, PageBatch, PageRequest

from served_memory import SERVED_TOKEN, Served  # type: ignore[import-not-found]

FAST = dict(backoff_initial_s=0.001, backoff_max_s=0.01, seed=3)


def pages_of(batch: PageBatch) -> bytes:
    return b"".join(bytes(n * PAGE_SIZE) if data is None else bytes(data) for _, n, data in batch.runs())


def run_behind_proxy(served: Served, schedule: ChaosSchedule,
                     body: Callable[[str, ChaosProxy], Awaitable[None]]) -> None:
    async def main() -> None:
        header = served.header
        async with PageServer.resumed(served.memory, header, header.encode(), token=SERVED_TOKEN) as server:
            url = await server.start("127.0.0.1", 0)
            port = int(url.rsplit(":", 1)[1])
            proxy = ChaosProxy("127.0.0.1", port, schedule)
            host, proxy_port = await proxy.start()
            try:
                await body(f"http://{host}:{proxy_port}", proxy)
            finally:
                await proxy.close()
    asyncio.run(main())


def test_backoff_grows_is_capped_and_jittered_within_the_deadline() -> None:
    ctx = RetryContext(RetryPolicy(deadline_s=60, backoff_initial_s=0.01, backoff_max_s=0.08, jitter=0.5, seed=1))
    outage = ctx.outage()
    delays = [outage.failed(FetchError("page stream closed")) for _ in range(6)]
    caps = [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps)), delays
    assert ctx.report()["failures"] == 6 and ctx.report()["reasons"] == {"closed": 6}


def test_an_outage_past_the_deadline_gives_up_with_the_last_reason() -> None:
    ctx = RetryContext(RetryPolicy(deadline_s=0.05, **FAST))  # type: ignore[arg-type]
    outage = ctx.outage()
    with pytest.raises(RetryExhausted, match="retry deadline 0.05 s.*checksum of page 0x3000"):
        while True:
            time.sleep(outage.failed(FetchError("checksum of page 0x3000 does not match")))
    assert ctx.report()["exhausted"] == 1


def test_a_fatal_refusal_is_not_retried() -> None:
    calls = 0

    async def refuse() -> None:
        nonlocal calls
        calls += 1
        raise FatalFetchError("GET /v1/vm/status: HTTP 401: missing or wrong bearer token")

    with pytest.raises(FatalFetchError, match="401"):
        asyncio.run(retry_async(RetryContext(RetryPolicy(**FAST)), "status", refuse))  # type: ignore[arg-type]
    assert calls == 1


@pytest.mark.parametrize(("how", "seed", "after"), [("fetch", 2, 400), ("fetch_page", 4, 200)])
def test_vcpu_fetch_reconnects_through_dropped_truncated_and_corrupted_streams(served: Served, how: str, seed: int,
                                                                             after: int) -> None:
    """Both ways a vCPU fetches: a window (fetch) and the fault path's one page (fetch_page,
    whose fast read gives way to the general recovery, which sends the request again on a new
    socket). Each of the first 6 connections is cut inside its first answers (the upgrade
    passes); every page arrives right."""
    schedule = ChaosSchedule(seed=seed, kinds=("drop", "truncate", "corrupt"), after_bytes=(after, 9000), max_faults=6)

    async def body(url: str, proxy: ChaosProxy) -> None:
        ctx = RetryContext(RetryPolicy(deadline_s=10, **FAST))  # type: ignore[arg-type]

        def fetch_all() -> list[tuple[int, bytes]]:
            conn = RetryingSyncConnection.open(lambda: SyncPageConnection(url, SERVED_TOKEN, receive_timeout=2), ctx)
            try:
                if how == "fetch":
                    return [(gpa, pages_of(conn.fetch(gpa, 4, "demand"))) for gpa in range(0, 64 * PAGE_SIZE, 4 * PAGE_SIZE)]
                return [(gpa, page_bytes(conn.fetch_page(gpa))) for gpa in range(0, 64 * PAGE_SIZE, PAGE_SIZE)]
            finally:
                conn.close()

        for gpa, data in await asyncio.to_thread(fetch_all):
            assert data == served.memory.read(gpa, len(data)), gpa
        assert proxy.stats.faults_injected == 6
        assert ctx.report()["reconnects"] >= 4 and ctx.report()["exhausted"] == 0

    run_behind_proxy(served, schedule, body)


def page_bytes(got: int | PageBatch) -> bytes:
    """What fetch_page gave, as bytes: a checked page in place (its address), or a batch."""
    return ctypes.string_at(got, PAGE_SIZE) if isinstance(got, int) else pages_of(got)


def test_vcpu_fetch_on_a_stalled_stream_times_out_and_asks_again(served: Served) -> None:
    schedule = ChaosSchedule(seed=1, kinds=("stall",), after_bytes=(400, 400), stall_s=(3.0, 3.0), stall_drop=0.0,
                             max_faults=1)

    async def body(url: str, proxy: ChaosProxy) -> None:
        ctx = RetryContext(RetryPolicy(deadline_s=10, **FAST))  # type: ignore[arg-type]

        def fetch() -> tuple[PageBatch, float]:
            t0 = time.monotonic()
            conn = RetryingSyncConnection.open(lambda: SyncPageConnection(url, SERVED_TOKEN, receive_timeout=0.2), ctx)
            try:
                return conn.fetch(8 * PAGE_SIZE, 2, "demand"), time.monotonic() - t0
            finally:
                conn.close()

        batch, took = await asyncio.to_thread(fetch)
        assert pages_of(batch) == served.memory.read(8 * PAGE_SIZE, 2 * PAGE_SIZE)
        assert took < 2.0  # well before the stall would have ended
        assert ctx.report()["reasons"] == {"closed": 1} or ctx.report()["failures"] == 1

    run_behind_proxy(served, schedule, body)


def _fetch_in_a_thread(conn: RetryingSyncConnection) -> tuple[threading.Thread, list[BaseException]]:
    """A vCPU's fetch of page 0 on a thread of its own; the list gets what it raised."""
    outcome: list[BaseException] = []

    def fetch() -> None:
        try:
            conn.fetch_page(0)
        except BaseException as e:  # noqa: BLE001 - the test reads what came out
            outcome.append(e)

    thread = threading.Thread(target=fetch)
    thread.start()
    return thread, outcome


def test_abort_ends_a_vcpu_fetch_waiting_for_a_dead_server_at_once(served: Served) -> None:
    schedule = ChaosSchedule(seed=1, kinds=("drop",), after_bytes=(1, 1))  # every connection dies at once

    async def body(url: str, proxy: ChaosProxy) -> None:
        ctx = RetryContext(RetryPolicy(deadline_s=60, backoff_initial_s=0.05, backoff_max_s=0.05))
        conn = RetryingSyncConnection(lambda: SyncPageConnection(url, SERVED_TOKEN), ctx)
        thread, outcome = _fetch_in_a_thread(conn)
        await asyncio.sleep(0.3)
        assert thread.is_alive()  # still retrying: the guest only waits
        t0 = time.monotonic()
        ctx.abort()
        await asyncio.to_thread(thread.join, 5)
        assert not thread.is_alive() and time.monotonic() - t0 < 1.0
        assert isinstance(outcome[0], RetryExhausted) and "aborted" in str(outcome[0])

    run_behind_proxy(served, schedule, body)


def test_a_vcpu_fetch_stops_retrying_once_its_page_came_another_way(served: Served) -> None:
    """A vCPU waiting for a dead source must not outlive it: once its page is present (the
    background got it from a restarted source that has since completed and gone), it stops."""
    schedule = ChaosSchedule(seed=1, kinds=("drop",), after_bytes=(1, 1))  # every connection dies at once

    async def body(url: str, proxy: ChaosProxy) -> None:
        ctx = RetryContext(RetryPolicy(deadline_s=60, backoff_initial_s=0.05, backoff_max_s=0.05))
        conn = RetryingSyncConnection(lambda: SyncPageConnection(url, SERVED_TOKEN), ctx)
        arrived = threading.Event()
        conn.still_wanted = lambda: not arrived.is_set()
        thread, outcome = _fetch_in_a_thread(conn)
        await asyncio.sleep(0.3)
        assert thread.is_alive()  # still retrying while the page is wanted
        arrived.set()
        await asyncio.to_thread(thread.join, 5)
        assert not thread.is_alive() and isinstance(outcome[0], NoLongerWanted)

    run_behind_proxy(served, schedule, body)


def test_pipelined_requests_are_asked_again_after_drops_and_each_answered_once(served: Served) -> None:
    """The background's way: several requests in flight on one blocking socket; a failure
    re-sends every one still waiting, on a new socket, and each is answered once, in order."""
    schedule = ChaosSchedule(seed=4, kinds=("drop", "corrupt", "truncate", "stall"), after_bytes=(2000, 200_000),
                             stall_s=(0.01, 0.05), max_faults=8)

    async def body(url: str, proxy: ChaosProxy) -> None:
        ctx = RetryContext(RetryPolicy(deadline_s=10, request_timeout_s=2, **FAST))  # type: ignore[arg-type]
        count, depth = 16, 4
        gpas = list(range(0, served.memory.size, count * PAGE_SIZE))

        def pull_all() -> list[tuple[int, bytes]]:
            conn = RetryingSyncConnection.open(lambda: SyncPageConnection(url, SERVED_TOKEN, receive_timeout=2), ctx)
            got: list[tuple[int, bytes]] = []
            in_flight = []
            try:
                for gpa in gpas:
                    in_flight.append(conn.send(gpa, count, "background"))
                    if len(in_flight) == depth:
                        batch = conn.receive(in_flight.pop(0))
                        got.append((batch.gpa, pages_of(batch)))  # a batch is valid until the next receive
                while in_flight:
                    batch = conn.receive(in_flight.pop(0))
                    got.append((batch.gpa, pages_of(batch)))
            finally:
                conn.close()
            return got

        got = await asyncio.to_thread(pull_all)
        assert [gpa for gpa, _ in got] == gpas
        for gpa, data in got:
            assert data == served.memory.read(gpa, count * PAGE_SIZE)
        assert proxy.stats.faults_injected >= 4 and ctx.report()["reconnects"] >= 3

    run_behind_proxy(served, schedule, body)


def test_pipelined_request_on_a_stalled_stream_times_out_and_is_asked_again(served: Served) -> None:
    schedule = ChaosSchedule(seed=1, kinds=("stall",), after_bytes=(400, 400), stall_s=(5.0, 5.0), stall_drop=0.0,
                             max_faults=1)

    async def body(url: str, proxy: ChaosProxy) -> None:
        ctx = RetryContext(RetryPolicy(deadline_s=10, request_timeout_s=0.2, **FAST))  # type: ignore[arg-type]

        def pull() -> tuple[bytes, bytes]:
            conn = RetryingSyncConnection.open(
                lambda: SyncPageConnection(url, SERVED_TOKEN, receive_timeout=ctx.policy.request_timeout_s), ctx)
            try:
                first, second = conn.send(PAGE_SIZE, 3, "background"), conn.send(8 * PAGE_SIZE, 2, "background")
                a = pages_of(conn.receive(first))
                return a, pages_of(conn.receive(second))
            finally:
                conn.close()

        t0 = time.monotonic()
        a, b = await asyncio.to_thread(pull)
        assert time.monotonic() - t0 < 3.0
        assert a == served.memory.read(PAGE_SIZE, 3 * PAGE_SIZE)
        assert b == served.memory.read(8 * PAGE_SIZE, 2 * PAGE_SIZE)
        assert ctx.report()["reasons"].get("stall") == 1

    run_behind_proxy(served, schedule, body)


def test_a_server_that_never_comes_back_fails_after_the_deadline() -> None:
    ctx = RetryContext(RetryPolicy(deadline_s=0.3, **FAST))  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(RetryExhausted, match="cannot open the page stream"):
        RetryingSyncConnection.open(lambda: SyncPageConnection("http://127.0.0.1:9", SERVED_TOKEN), ctx)
    assert 0.3 <= time.monotonic() - t0 < 2.0


def test_bytes_flipped_around_the_upgrade_and_the_first_frame_header_never_install_a_wrong_page(served: Served) -> None:
    # Each connection gets one flipped byte 120-400 bytes in: in the HTTP upgrade answer (202
    # bytes here), in the first WebSocket frame header (a desynchronised stream) or in the
    # msgpack framing and page data after it. Each fetch opens a new connection.
    schedule = ChaosSchedule(seed=9, kinds=("corrupt",), after_bytes=(120, 400), repeat=False)

    async def body(url: str, proxy: ChaosProxy) -> None:
        ctx = RetryContext(RetryPolicy(deadline_s=10, **FAST))  # type: ignore[arg-type]

        def fetch_one(page: int) -> PageBatch:
            conn = RetryingSyncConnection.open(lambda: SyncPageConnection(url, SERVED_TOKEN, receive_timeout=1), ctx)
            try:
                return conn.fetch(page * PAGE_SIZE, 1, "demand")
            finally:
                conn.close()

        for page in range(1, 60):
            batch = await asyncio.to_thread(fetch_one, page)
            assert pages_of(batch) == served.memory.read(page * PAGE_SIZE, PAGE_SIZE)
        assert proxy.stats.injected["corrupt"] >= 59 and ctx.report()["failures"] >= 20, (proxy.report(), ctx.report())

    run_behind_proxy(served, schedule, body)


def test_a_socket_opened_while_the_destination_closes_is_closed_not_kept() -> None:
    """The destination aborts and closes the connection while a reconnect sends its requests
    again (after the reconnect's own abort check): the new socket is dropped, not kept by a
    closed connection."""
    ctx = RetryContext(RetryPolicy(deadline_s=5))
    closed: list[bool] = []

    class Socket:
        def __init__(self) -> None:
            self.closed = False
            closed.append(False)

        def send_request(self, request: PageRequest) -> None:
            ctx.abort()  # the destination, now: abort, then close every connection
            wrapper.close()

        def close(self) -> None:
            self.closed = True
            closed[-1] = True

    wrapper = RetryingSyncConnection(Socket, ctx)  # type: ignore[arg-type]
    wrapper._in_flight.append(PageRequest(0, 1, "background"))
    with pytest.raises(RetryExhausted, match="aborted"):
        wrapper._reconnect(ctx.outage(), None)
    assert closed == [True] and wrapper._conn is None
