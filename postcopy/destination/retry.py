"""Riding out network faults: a retry policy (exponential backoff with jitter, bounded by a
deadline) and connection wrappers that drop a broken page stream, reconnect and ask again.

Whatever goes wrong with an answer (the socket closed or stalled, a frame that does not decode,
a checksum that does not match) is a FetchError from the connection, and nothing of that answer
was installed. The wrappers never touch page state: a request's pages stay claimed in the page
tracker while it is retried, so the same pages are asked for again, on a new socket, and
installed once. The guest only waits. When one outage outlasts the deadline (or the migration
is aborted) the wrapper raises RetryExhausted with the last error, and the destination fails
the migration with the guest paused.
"""
from __future__ import annotations

import asyncio
import collections
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from postcopy.destination.client import DEMAND, FastSource, FetchError, SyncPageConnection
from proto import PageBatch, PageRequest

T = TypeVar("T")
DEFAULT_DEADLINE_S = 30.0


@dataclass(slots=True)
class RetryPolicy:
    """How hard the destination tries. ``deadline_s`` bounds one outage: from the first failure
    of a request (or reconnect) with no success since, retrying stops after this long."""

    deadline_s: float = DEFAULT_DEADLINE_S
    backoff_initial_s: float = 0.005
    backoff_max_s: float = 0.5
    backoff_multiplier: float = 2.0
    jitter: float = 0.5  # each delay is scaled by a uniform factor in [1 - jitter, 1]
    request_timeout_s: float = 5.0  # an answer slower than this is a stalled stream
    seed: int | None = None


class RetryExhausted(FetchError):
    """Retrying stopped: the deadline passed or the migration was aborted."""


class NoLongerWanted(FetchError):
    """Retrying stopped because what the request was for arrived another way (a vCPU whose page
    the background installed during the outage): nothing is lost."""


class FatalFetchError(FetchError):
    """A refusal that asking again cannot change (a wrong token, an untrusted certificate):
    never retried."""


@dataclass(slots=True)
class RetryStats:
    """What the wrappers did, for the report (updated under the context's lock)."""

    failures: int = 0  # failed attempts (each is followed by a retry or gives up)
    reconnects: int = 0  # new sockets opened after a failure
    exhausted: int = 0
    longest_outage_ms: float = 0.0  # first failure -> new socket open
    reasons: dict[str, int] = field(default_factory=dict)


# A FetchError's message -> a short reason for the report; the first matching word wins.
_REASONS: tuple[tuple[str, str], ...] = (
    ("checksum", "checksum"), ("no answer", "stall"), ("timed out", "stall"), ("cannot open", "connect"),
    ("malformed", "malformed"), ("refused", "refused"), ("answers", "mismatch"), ("closed", "closed"),
    ("broke", "closed"),
)


def reason_of(error: BaseException) -> str:
    text = str(error).lower()
    return next((name for word, name in _REASONS if word in text), "other")


class RetryContext:
    """One migration's retry state, shared by all its connections (vCPU threads, the
    background thread, the event loop's requests): the policy, the counters, and the abort switch that ends every retry at once."""

    def __init__(self, policy: RetryPolicy | None = None) -> None:
        self.policy = policy or RetryPolicy()
        self.stats = RetryStats()
        self.aborted = threading.Event()
        self._lock = threading.Lock()
        self._rng = random.Random(self.policy.seed)

    def abort(self) -> None:
        """Stop every retry now (the migration failed or is closing)."""
        self.aborted.set()

    def outage(self) -> Outage:
        return Outage(self)

    def _record(self, error: BaseException) -> float:
        """Count a failure; return the jitter factor for its delay."""
        with self._lock:
            s = self.stats
            s.failures += 1
            reason = reason_of(error)
            s.reasons[reason] = s.reasons.get(reason, 0) + 1
            return 1.0 - self.policy.jitter * self._rng.random()

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self.stats, what, getattr(self.stats, what) + 1)

    def _reconnected(self, outage: Outage) -> None:
        with self._lock:
            self.stats.reconnects += 1
            self.stats.longest_outage_ms = max(self.stats.longest_outage_ms,
                                               round((time.monotonic() - outage.started) * 1e3, 3))

    def report(self) -> dict[str, Any]:
        with self._lock:
            return asdict(self.stats)


class Outage:
    """One run of consecutive failures: its start, its attempts, its next delay."""

    __slots__ = ("ctx", "started", "attempts")

    def __init__(self, ctx: RetryContext) -> None:
        self.ctx = ctx
        self.started = time.monotonic()
        self.attempts = 0

    def failed(self, error: BaseException) -> float:
        """Record ``error``; return how long to wait before the next attempt, or raise
        RetryExhausted if the deadline has passed or the migration was aborted."""
        ctx, policy = self.ctx, self.ctx.policy
        elapsed = time.monotonic() - self.started
        jitter = ctx._record(error)
        if isinstance(error, FatalFetchError):
            raise error
        if ctx.aborted.is_set():
            raise RetryExhausted(f"retry aborted: {error}")
        if elapsed >= policy.deadline_s:
            ctx._count("exhausted")
            raise RetryExhausted(f"gave up after {elapsed:.1f} s and {self.attempts + 1} attempts "
                                 f"(retry deadline {policy.deadline_s} s): {error}")
        delay = min(policy.backoff_max_s, policy.backoff_initial_s * policy.backoff_multiplier ** self.attempts)
        self.attempts += 1
        return min(delay * jitter, max(0.0, policy.deadline_s - elapsed))


def _as_fetch_error(error: BaseException, what: str) -> FetchError:
    if isinstance(error, FetchError):
        return error
    if isinstance(error, TimeoutError):
        return FetchError(f"no answer to {what} within the request timeout")
    return FetchError(f"{what}: {error}")


# -- the blocking connections: a vCPU thread's, the background thread's -----------------------

class RetryingSyncConnection:
    """A SyncPageConnection that survives its socket, for the one thread that uses it: a vCPU
    thread's ``fetch``, or the background thread's pipelined ``send`` and ``receive`` (answers
    come in order). When a request fails, the socket is closed, the thread backs off (the guest
    only waits), opens a new one and sends again, in order, every request still in flight."""

    def __init__(self, connect: Callable[[], SyncPageConnection], ctx: RetryContext) -> None:
        self._connect = connect
        self.ctx = ctx
        self._conn: SyncPageConnection | None = None
        self._in_flight: collections.deque[PageRequest] = collections.deque()
        self._outage: Outage | None = None  # the failures since the last answer
        # Asked before each new attempt during an outage: False ends the retrying with
        # NoLongerWanted (a vCPU's page arrived meanwhile, and the source may be gone for good).
        self.still_wanted: Callable[[], bool] | None = None

    @classmethod
    def open(cls, connect: Callable[[], SyncPageConnection], ctx: RetryContext) -> RetryingSyncConnection:
        self = cls(connect, ctx)
        self._reconnect(ctx.outage(), None)
        return self

    def fetch(self, gpa: int, count: int, kind: str) -> PageBatch:
        return self.receive(self.send(gpa, count, kind))

    def fetch_page(self, gpa: int) -> int | PageBatch:
        """SyncPageConnection.fetch_page, surviving the socket as fetch does: after a failure
        the request joins those in flight and is sent again on the new socket."""
        conn = self._conn
        if conn is None or self._in_flight:  # recovering, or a pipeline in use: the general way
            return self.fetch(gpa, 1, DEMAND)
        try:
            return conn.fetch_page(gpa)
        except FetchError as error:
            return self._page_again(gpa, error)

    def fast_source(self) -> FastSource | None:
        """SyncPageConnection.fast_source of the socket now, or None while recovering."""
        conn = self._conn
        return conn.fast_source() if conn is not None and not self._in_flight else None

    def add_fast_requests(self, n: int) -> None:
        if self._conn is not None:
            self._conn.add_fast_requests(n)

    def finish_page(self, gpa: int, received: int, error: int) -> int | PageBatch:
        """SyncPageConnection.finish_page, surviving the socket as fetch_page does."""
        try:
            if self._conn is None:
                raise FetchError("page stream closed")
            return self._conn.finish_page(gpa, received, error)
        except FetchError as error:
            return self._page_again(gpa, error)

    def _page_again(self, gpa: int, error: FetchError) -> int | PageBatch:
        """A one-page fetch whose socket failed: asked again on a new one, as fetch would."""
        request = PageRequest(gpa, 1, DEMAND)
        self._in_flight.append(request)
        self._recover(error)
        return self.receive(request)

    def send(self, gpa: int, count: int, kind: str) -> PageRequest:
        request = PageRequest(gpa, count, kind)  # type: ignore[arg-type]
        self._in_flight.append(request)
        conn = self._conn
        try:
            if conn is None:
                raise FetchError("page stream closed")
            conn.send_request(request)
        except FetchError as error:
            self._recover(error)  # the new socket carries it with the others in flight
        return request

    def receive(self, request: PageRequest) -> PageBatch:
        """The answer to ``request``, the oldest in flight (valid until the next receive)."""
        while True:
            conn = self._conn
            try:
                if conn is None:
                    raise FetchError("page stream closed")
                batch = conn.receive(request)
            except FetchError as error:
                self._recover(error)
                continue
            self._in_flight.popleft()
            self._outage = None
            return batch

    def _recover(self, error: FetchError) -> None:
        self._drop()
        self._outage = self._outage or self.ctx.outage()
        try:
            self._reconnect(self._outage, error)
        except FetchError:  # given up: what was in flight will never be answered here
            self._in_flight.clear()
            self._outage = None
            raise

    def _reconnect(self, outage: Outage, error: FetchError | None) -> None:
        """Back off after ``error`` (if any), open a new socket and send it every request in
        flight, until that works."""
        while True:
            if error is not None:
                # Before the deadline or an abort can fail the guest: a page that arrived
                # another way ends the wait as it is.
                if self.still_wanted is not None and not self.still_wanted():
                    raise NoLongerWanted(f"stopped retrying: what was asked for arrived meanwhile ({error})")
                if self.ctx.aborted.wait(outage.failed(error)):
                    raise RetryExhausted(f"retry aborted: {error}")
            conn = None
            try:
                conn = self._connect()
                if self.ctx.aborted.is_set():  # closed meanwhile: this socket would have no owner
                    raise RetryExhausted(f"retry aborted: {error}")
                for request in self._in_flight:
                    conn.send_request(request)
            except FetchError as e:
                if conn is not None:
                    _close_quietly(conn)
                if isinstance(e, RetryExhausted):
                    raise
                error = e
                continue
            self._conn = conn
            if self.ctx.aborted.is_set():  # closed while it was sending: close() may have missed it
                self._drop()
                raise RetryExhausted(f"retry aborted: {error}")
            if outage.attempts:
                self.ctx._reconnected(outage)
            return

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            _close_quietly(conn)

    def close(self) -> None:
        self._drop()


def _close_quietly(conn: SyncPageConnection) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - a broken socket may fail to close; it is gone either way
        pass


async def retry_async(ctx: RetryContext, what: str, call: Callable[[], Awaitable[T]]) -> T:
    """Run an idempotent request (start, status, complete) until it succeeds or the deadline."""
    outage: Outage | None = None
    while True:
        try:
            return await call()
        except FetchError as error:
            outage = outage or ctx.outage()
            await asyncio.sleep(outage.failed(_as_fetch_error(error, what)))
