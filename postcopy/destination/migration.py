"""The destination side of one post-copy migration, as an explicit state machine:

    NEW --prepare--> LISTEN --switchover--> RUNNING --all pages present--> COMPLETE
      (any state) --error--> FAILED

LISTEN: the VM exists, its RAM registered with userfaultfd, empty, its vCPU threads started
and parked before their first KVM_RUN. switchover: ask the source to pause (its answer is the
header), install the eager set, restore state, release the vCPUs. RUNNING: faults are served
(exit or classic mode); once the vCPUs run, the source's zero map is fetched (until then a zero
page is fetched like any other, and comes as a zero bit with no data), then the background
transfer installs the zero pages and pulls the rest. COMPLETE: every page present, the source
told to release the guest (RAM stays registered with userfaultfd until close). The guest never
stops.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

import aiohttp

from postcopy.destination import private_loop
from postcopy.destination.background import DEFAULT_BATCH_PAGES, DEFAULT_DEPTH, DEFAULT_STREAMS, run_background
from postcopy.destination.classic_mode import ClassicHandler, handler_cpus, place_vcpus
from postcopy.destination.client import (MAX_WS_MESSAGE, FetchError, SyncPageConnection, auth_headers,
                                         fetch_zero_map, start_migration, tls_option)
from postcopy.destination.exit_mode import ExitModeResolver, fetch_poll_ns
from postcopy.destination.install import Installer
from postcopy.destination.pages import ARRIVAL_NAMES, Arrival, PageTracker
from postcopy.destination.prefetch import answer_bytes
from postcopy.destination.readahead import DEFAULT_BASE, DEFAULT_MAX
from postcopy.destination.retry import RetryContext, RetryingSyncConnection, RetryPolicy, retry_async
from postcopy.destination.vcpu_priority import POSTCOPY_VCPU_NICE, VcpuPriority
from postcopy.observe.collect import register_destination
from postcopy.observe.faultlog import CLASSIC_KINDS, EXIT_KINDS, FaultLog, blocktime_ns, kind_totals, latencies_ns
from postcopy.observe.prometheus import Registry
from postcopy.observe.series import Sampler, Series
from postcopy.observe.timeline import build_timeline
from proto import Complete, MigrationHeader, ProtoError
from vmm import state as vmstate
from vmm.abi.userfaultfd import UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_SIGBUS, UFFD_FEATURE_THREAD_ID
from vmm.machine import Machine, MachineConfig
from vmm.memory import GuestMemory
from vmm.uffd import Uffd, UffdError

log = logging.getLogger("postcopy.destination")
FaultMode = Literal["exit", "classic"]
# The GIL is handed between threads every switch interval: a vCPU thread back from KVM_RUN
# must not wait 5 ms (the default) behind the background transfer.
SWITCH_INTERVAL_S = 0.0002
# Pages present and guest progress are sampled this often, from the event loop, for the timeline.
SAMPLE_INTERVAL_S = 0.01
RESUME_WAIT_S, RESUME_POLL_S = 0.1, 0.0002  # the background starts once the vCPUs run (or after this)


class DestinationState(enum.Enum):
    NEW = "new"
    LISTEN = "listen"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


_ALLOWED = {
    DestinationState.NEW: {DestinationState.LISTEN, DestinationState.FAILED},
    DestinationState.LISTEN: {DestinationState.RUNNING, DestinationState.FAILED},
    DestinationState.RUNNING: {DestinationState.COMPLETE, DestinationState.FAILED},
    DestinationState.COMPLETE: set(),
    DestinationState.FAILED: set(),
}


class MigrationError(Exception):
    """The migration failed; the message says in which state and why."""


@dataclass(slots=True)
class MigrationResult:
    fault_mode: str
    downtime_ms: float | None  # source pause -> first KVM_RUN here (same host clock only)
    switchover_ms: float  # header request sent -> vCPUs started, measured here
    total_ms: float  # source pause (or header request) -> all pages present
    pages: dict[str, int]
    exit_kinds: dict[str, int]
    guest_mib: int
    vcpus: int
    header_bytes: int
    eager_pages: int
    fault_latency_us: dict[str, float] = field(default_factory=dict)
    pagein_rate: float = 0.0  # pages/s from switchover to completion
    blocktime_ms: dict[int, float] = field(default_factory=dict)
    retries: dict[str, Any] = field(default_factory=dict)  # what the retry wrappers did
    vcpu_nice: int = 0  # the vCPU threads' nice value while memory was missing (0: left as they were)
    # vCPUs (exit) or handler threads (classic) whose fault loop ran in a private interpreter
    private_fault_loops: int = 0


@dataclass(slots=True)
class DestinationProgress:
    state: str
    pages_total: int
    pages_present: int
    pages: dict[str, int]  # present pages by arrival kind
    running_s: float  # vCPUs started here -> all pages present (or now); 0 before the switchover


class Destination:
    def __init__(self, source_url: str, token: str, *, fault_mode: FaultMode = "exit",
                 readahead_base: int = DEFAULT_BASE, readahead_max: int = DEFAULT_MAX, background: bool = True,
                 console: Callable[[str], None] | None = None, registry: Registry | None = None,
                 retry: RetryPolicy | None = None, ssl_context: ssl.SSLContext | None = None,
                 background_batch_pages: int = DEFAULT_BATCH_PAGES, background_depth: int = DEFAULT_DEPTH,
                 background_streams: int = DEFAULT_STREAMS, vcpu_nice: int = POSTCOPY_VCPU_NICE) -> None:
        self.source_url = source_url.rstrip("/")
        self.token = token
        self.fault_mode = fault_mode
        self.readahead_base = readahead_base
        self.readahead_max = readahead_max
        self.background = background
        self.console = console
        self.retry = RetryContext(retry)
        self.ssl_context = ssl_context
        self.background_batch_pages = background_batch_pages
        self.background_depth = background_depth
        self.background_streams = max(1, background_streams)
        self.vcpu_priority = VcpuPriority(vcpu_nice)  # while memory is missing (vcpu_priority.py)
        self.state = DestinationState.NEW
        self.machine: Machine | None = None
        self.memory: GuestMemory | None = None
        self.uffd: Uffd | None = None
        self.tracker: PageTracker | None = None
        self.installer: Installer | None = None
        self.resolver: ExitModeResolver | None = None
        self.classic: ClassicHandler | None = None
        self.header: MigrationHeader | None = None
        self._session: aiohttp.ClientSession | None = None
        self._background: asyncio.Future[None] | None = None  # the transfer (wait_complete), awaited by close()
        self._opened: list[RetryingSyncConnection] = []  # every connection prepare() opened (_open_kept)
        self._opened_lock = threading.Lock()
        self._closed = False
        # exit: one per vCPU; classic: one per handler thread
        self._vcpu_connections: list[RetryingSyncConnection] = []
        self._prefetch_connections: list[RetryingSyncConnection] = []  # a scanning vCPU's prefetcher each
        self._background_connections: list[RetryingSyncConnection] = []  # pipelined, a thread each
        self._started_ns = 0
        self._done_ns = 0
        self.error: str | None = None
        self.fetch_errors = 0
        self._resume_ns = 0
        self._faults_at_done: dict[int, int] | None = None  # fault records per vCPU at completion
        # Sampled for the timeline from the switchover on (pages by arrival; guest progress).
        self.pages_series = Series([ARRIVAL_NAMES[a] for a in Arrival])
        self.progress_series = Series(["verified"])
        self._sampler = Sampler(SAMPLE_INTERVAL_S, self._sample)
        self.registry = registry if registry is not None else Registry()
        register_destination(self.registry, self)

    @property
    def migration_id(self) -> str | None:
        return self.header.migration_id if self.header is not None else None

    def _to(self, new: DestinationState) -> None:
        if new not in _ALLOWED[self.state]:
            raise MigrationError(f"destination cannot go from {self.state.value} to {new.value}")
        log.info("destination: %s -> %s", self.state.value, new.value,
                 extra={"event": "state", "side": "destination", "migration_id": self.migration_id,
                        "from": self.state.value, "to": new.value, "fault_mode": self.fault_mode})
        self.state = new

    # -- LISTEN --------------------------------------------------------------------------------
    async def prepare(self, mem_bytes: int, vcpus: int) -> None:
        """Build the VM with empty, registered RAM and open every connection, before the source
        pauses: none of this is downtime. Once only; a failure leaves this destination FAILED,
        and close() frees what it had built."""
        if self.state is not DestinationState.NEW:
            raise MigrationError(f"a destination is prepared once, in state new, not {self.state.value}")
        try:
            await self._prepare(mem_bytes, vcpus)
        except BaseException:
            if self.state is not DestinationState.FAILED:
                self._to(DestinationState.FAILED)
            if self.machine is None and self.memory is not None:  # close() frees RAM through the machine
                self._unregister_ram()
                self.memory.close()
                self.memory = None
            raise

    async def _prepare(self, mem_bytes: int, vcpus: int) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        # Classic: each fault message names its thread, so blocktime is per vCPU.
        features = UFFD_FEATURE_SIGBUS if self.fault_mode == "exit" else UFFD_FEATURE_THREAD_ID
        try:
            self.uffd = Uffd(features | UFFD_FEATURE_MISSING_SHMEM)
        except UffdError as e:
            raise MigrationError(f"cannot open userfaultfd for fault mode {self.fault_mode}: {e}") from None
        self.memory = GuestMemory.create(mem_bytes, "anon", "postcopy-dest")
        for region in self.memory.regions:
            self.uffd.register(region.hva, region.size)
        self.machine = Machine.create(MachineConfig(mem_bytes, vcpus), console=self.console, memory=self.memory)
        # Built here, not at the switchover (their size grows with the guest): the zero map
        # they start without comes after the resume (_apply_zero_map).
        self.tracker = PageTracker(self.memory)
        self.installer = Installer(self.uffd, self.memory, self.tracker, wake=self.fault_mode == "classic")
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls_option(self.ssl_context)))
        fetchers = vcpus if self.fault_mode == "exit" else len(handler_cpus(vcpus))
        prefetchers = vcpus if self.fault_mode == "exit" and self.readahead_max > 1 else 0
        # one per vCPU (or classic handler), one per vCPU's prefetcher, then the background streams'
        poll_ns = fetch_poll_ns(vcpus) if self.fault_mode == "exit" else 0

        def open_vcpu() -> SyncPageConnection:
            return self._open_sync(poll_ns=poll_ns)
        connect = [open_vcpu] * fetchers + [self._open_prefetch] * prefetchers + [self._open_sync] * self.background_streams
        opened = await asyncio.gather(*(asyncio.to_thread(self._open_kept, c) for c in connect),
                                      return_exceptions=True)
        connections = [c for c in opened if isinstance(c, RetryingSyncConnection)]
        if len(connections) < len(opened):  # close the ones that did open: nobody else will
            for c in connections:
                await asyncio.to_thread(c.close)
            raise next(e for e in opened if isinstance(e, BaseException))
        self._vcpu_connections = list(connections[:fetchers])
        self._prefetch_connections = list(connections[fetchers:fetchers + prefetchers])
        self._background_connections = list(connections[fetchers + prefetchers:])
        # each fetcher's fault loop in a private interpreter: loaded here, off the event loop
        await asyncio.to_thread(private_loop.warm, fetchers)
        self._park_vcpus()
        self._to(DestinationState.LISTEN)

    def _park_vcpus(self) -> None:
        """Start the vCPU threads now, parked before their first KVM_RUN, and in classic mode
        the fault handler's threads: starting a thread waits until it runs, one wake-up per
        thread that a busy host delays, and the switchover then only releases the vCPUs (their
        state is restored while they wait). What a vCPU thread reads as it starts is set first:
        the exit-mode fault handler (it blocks SIGBUS there), its CPU (both modes pin the vCPUs)."""
        assert self.machine and self.installer
        # vCPUs pinned round robin in both modes: the classic handler is placed beside them (one
        # per CPU they use), and in exit mode a vCPU thread's fetch pairs with the source's
        # thread for its socket on its CPU instead of chasing it across CPUs (2 vCPUs: fetch
        # p99 ~170 against ~210 us unpinned, docs/perf/journal.md).
        cpus = place_vcpus(self.machine.vcpus)
        if self.fault_mode == "exit":
            self.resolver = ExitModeResolver(self.installer, readahead_base=self.readahead_base,
                                             readahead_max=self.readahead_max)
            prefetch = self._prefetch_connections or [None] * len(self.machine.vcpus)
            for thread, conn, ahead in zip(self.machine.vcpus, self._vcpu_connections, prefetch):
                self.resolver.prepare(thread, conn, ahead)
        for thread in self.machine.vcpus:
            thread.pause()  # not started yet: it parks as soon as it starts
        self.machine.start()
        if self.fault_mode == "classic":  # one pinned handler per CPU the vCPUs use; it polls until a fault
            self.classic = ClassicHandler(self.uffd, self.installer, list(self._vcpu_connections),
                                          cpus=list(cpus), readahead_base=self.readahead_base,
                                          readahead_max=self.readahead_max, vcpus=self.machine.vcpus)
            self.classic.start()

    def _open_kept(self, connect: Callable[[], SyncPageConnection]) -> RetryingSyncConnection:
        """A connection opened on a thread of prepare()'s, kept where close() finds it: a prepare
        cancelled while connections open loses their threads' results, not their sockets."""
        conn = RetryingSyncConnection.open(connect, self.retry)
        with self._opened_lock:
            if not self._closed:
                self._opened.append(conn)
                return conn
        conn.close()  # close() ran meanwhile: nobody else would
        raise MigrationError("the destination was closed while it connected")

    def _open_sync(self, max_message: int = MAX_WS_MESSAGE, poll_ns: int = 0) -> SyncPageConnection:
        return SyncPageConnection(self.source_url, self.token, ssl_context=self.ssl_context,
                                  receive_timeout=self.retry.policy.request_timeout_s, max_message=max_message,
                                  poll_ns=poll_ns)

    def _open_prefetch(self) -> SyncPageConnection:
        """A prefetcher's: its answers are one readahead window at most, so a buffer that size."""
        return self._open_sync(answer_bytes(self.readahead_max))

    # -- RUNNING -------------------------------------------------------------------------------
    async def switchover(self) -> None:
        if self.state is not DestinationState.LISTEN:  # before anything: never restore a running guest
            raise MigrationError(f"a destination switches over once, from listen, not {self.state.value}")
        try:
            await self._switchover()
        except BaseException:
            # The source is paused now (or may be): this destination must not be left in LISTEN
            # as if it could still take the guest.
            self.retry.abort()
            if self.state is not DestinationState.FAILED:
                self._to(DestinationState.FAILED)
            raise

    async def _switchover(self) -> None:
        assert self.machine and self.memory and self.uffd and self._session and self.installer
        t0 = time.monotonic_ns()
        self._switch_started_ns = t0
        session = self._session
        header, self.header_bytes = await retry_async(  # idempotent: the source answers the same header
            self.retry, "migration start", lambda: start_migration(session, self.source_url, self.token))
        self.header = header
        if [(r.gpa, r.size) for r in header.regions] != [(r.gpa, r.size) for r in self.memory.regions]:
            raise MigrationError(f"source memory layout {header.regions} differs from the one prepared here")
        if len(header.vcpus) != len(self.machine.vcpus):
            raise MigrationError(f"source has {len(header.vcpus)} vCPUs, this VM {len(self.machine.vcpus)}")
        for run in header.eager:
            self.installer.install_run(run.gpa, run.data, Arrival.EAGER)
        vmstate.restore(self.machine, header.vcpus, header.vm_state, header.devices)
        self.machine.resume()  # the vCPU threads parked in prepare() enter the guest
        self._started_ns = time.monotonic_ns()
        self._sample(self._started_ns)  # the series start at the resume, whenever the loop gets to sample
        self._sampler.start()
        self._to(DestinationState.RUNNING)

    async def wait_complete(self, timeout: float | None = None) -> MigrationResult:
        """Run the background transfer (or wait for demand alone) until every page is present."""
        assert self.tracker and self.machine and self.uffd and self.memory and self.header
        await self._resumed()
        background: asyncio.Future[None] | None = None
        deadline = None if timeout is None else time.monotonic() + timeout
        # After the resume (the first KVM_RUNs are downtime), until every page is present.
        self.vcpu_priority.lower(self.machine.vcpus, self.migration_id)
        try:
            await self._apply_zero_map()
            background = self._background = asyncio.ensure_future(run_background(
                self._background_connections, self.installer, batch_pages=self.background_batch_pages,
                depth=self.background_depth)) if self.background else None
            while not self.tracker.check_complete():
                failures = self.machine.failures()
                if failures:
                    raise MigrationError("; ".join(failures))
                if background is not None and background.done():
                    background.result()  # raises the transfer's error
                    background = None
                if self.classic is not None and self.classic.error is not None:
                    raise MigrationError(f"classic fault handler: {self.classic.error}")
                if deadline is not None and time.monotonic() > deadline:
                    raise MigrationError(f"{self.tracker.missing()} pages still missing after {timeout} s")
                await asyncio.sleep(0.002)
            failures = self.machine.failures()  # a vCPU that failed since the last look: no COMPLETE
            if failures:
                raise MigrationError("; ".join(failures))
        except (FetchError, MigrationError, UffdError) as e:
            self.error = str(e)
            if isinstance(e, FetchError) or (self.classic is not None and self.classic.error is not None):
                self.fetch_errors += 1
            log.error("migration failed while running: %s", e, extra={
                "event": "migration_failed", "migration_id": self.migration_id, "error": str(e),
                "pages_missing": self.tracker.missing()})
            self.retry.abort()  # vCPUs waiting out a backoff give up now, so they can be paused
            self._to(DestinationState.FAILED)
            self.machine.pause()  # never run a guest on memory it did not get
            raise MigrationError(f"migration failed while running: {e}") from None
        finally:
            self.vcpu_priority.restore()
            if background is not None:
                if not background.done():
                    background.cancel()
                elif not background.cancelled():
                    background.exception()  # seen: the error that ended the migration is reported above
        done_ns = self._done_ns = time.monotonic_ns()
        if self.resolver is not None:  # every fault in the report: the loops return theirs
            await asyncio.to_thread(self.resolver.flush_private_loops)
        # RAM stays registered until close(): a vCPU may still be finishing a fault it took
        # before the last page arrived (the background installed that page meanwhile); its
        # UFFDIO_COPY must meet EEXIST (skipped), not ENOENT from an unregistered range.
        if self.classic is not None:
            self.classic.stop()
        self._to(DestinationState.COMPLETE)
        await self._tell_source(done_ns)
        return self._result(done_ns)

    async def _resumed(self) -> None:
        """Until every vCPU has entered the guest (or failed, or RESUME_WAIT_S went by): a vCPU
        thread needs the GIL on its way to its first KVM_RUN, and the background thread started
        beside it would hold it for much of that time, which is downtime."""
        deadline = time.monotonic() + RESUME_WAIT_S
        assert self.machine
        while any(not t.first_run_ns and t.alive for t in self.machine.vcpus) and time.monotonic() < deadline:
            await asyncio.sleep(RESUME_POLL_S)

    async def _apply_zero_map(self) -> None:
        """Fetch the source's zero map and hand it to the tracker, with the vCPUs already
        running. Before this the tracker's map is empty, which is always right (a zero page is
        fetched, and answered as a zero bit); after it, the pages it marks are installed as
        zero pages, never fetched. One attribute store: a reader sees one map or the other."""
        assert self.header and self.tracker and self._session
        session = self._session
        zero_map, _ = await retry_async(  # idempotent: the source builds it once
            self.retry, "zero map", lambda: fetch_zero_map(session, self.source_url, self.token))
        try:
            self.header.check_zero_map(zero_map)
        except ProtoError as e:
            raise MigrationError(f"bad zero map from the source: {e}") from None
        self.tracker.set_zero_map(zero_map.zero_bitmap)

    async def _tell_source(self, done_ns: int) -> None:
        assert self.header and self.tracker and self._session
        stats = {k: v for k, v in self.tracker.counts_by_name().items()}
        msg = Complete(self.header.migration_id, stats)
        session = self._session

        async def post() -> None:
            try:
                async with session.post(f"{self.source_url}/v1/migration/complete", data=msg.encode(),
                                        headers=auth_headers(self.token)) as resp:
                    if resp.status >= 300:
                        log.warning("source answered completion with HTTP %d: %s", resp.status, await resp.text())
            except (aiohttp.ClientError, OSError) as e:
                raise FetchError(f"cannot tell the source the migration is complete: {e}") from None
        try:  # a restarted page server waits for this Complete to exit: keep trying
            await retry_async(self.retry, "migration complete", post)
        except FetchError as e:
            log.warning("%s", e)

    def _result(self, done_ns: int) -> MigrationResult:
        assert self.header and self.tracker and self.machine
        downtime = self.downtime_ms()
        begin = self._origin_ns()
        self._faults_at_done = {vcpu: len(fl) for vcpu, fl in self._live_fault_logs().items()}
        logs = self.fault_logs()
        exit_kinds = kind_totals(logs.values(), self.fault_kinds())
        latencies = latencies_ns(logs.values())
        blocktime = {v: ns / 1e6 for v, ns in blocktime_ns(logs).items()}
        running_s = max((done_ns - self._started_ns) / 1e9, 1e-9)
        fetched = self.tracker.npages - self.tracker.counts[Arrival.EAGER]
        return MigrationResult(
            fault_mode=self.fault_mode,
            downtime_ms=round(downtime, 3) if downtime is not None else None,
            switchover_ms=round((self._started_ns - self._switch_started_ns) / 1e6, 3),
            total_ms=round((done_ns - begin) / 1e6, 3),
            pages=self.tracker.counts_by_name(),
            exit_kinds=exit_kinds,
            guest_mib=self.memory.size >> 20 if self.memory else 0,
            vcpus=len(self.machine.vcpus),
            header_bytes=self.header_bytes,
            eager_pages=self.tracker.counts[Arrival.EAGER],
            fault_latency_us=_percentiles(latencies),
            pagein_rate=round(fetched / running_s, 1),
            blocktime_ms=blocktime,
            retries=self.retry.report(),
            vcpu_nice=self.vcpu_priority.applied,
            private_fault_loops=(self.resolver.private_loop_count() if self.resolver is not None
                                 else self.classic.private_loop_count() if self.classic is not None else 0),
        )

    # -- what it looked like -------------------------------------------------------------------
    def fault_logs(self) -> dict[int, FaultLog]:
        """Each vCPU's fault records (vCPU -1: faults no vCPU could be named for). Once every
        page is present, the records up to that moment: a vCPU still finishing a fault then
        (its page arrived by the background meanwhile) does not change the report afterwards,
        so the report, its timeline and /metrics count the same faults."""
        logs = self._live_fault_logs()
        if self._faults_at_done is None:
            return logs
        return {vcpu: fl.head(self._faults_at_done.get(vcpu, 0)) for vcpu, fl in logs.items()}

    def _live_fault_logs(self) -> dict[int, FaultLog]:
        if self.resolver is not None:
            return self.resolver.fault_logs()
        if self.classic is not None:
            return self.classic.fault_logs()
        return {}

    def fault_kinds(self) -> range:
        return EXIT_KINDS if self.fault_mode == "exit" else CLASSIC_KINDS

    def _origin_ns(self) -> int:
        """Time zero of the timeline: the source's pause where it shares our clock (same boot),
        else the moment we asked for the switchover (which is when the source paused, give or
        take the request's flight)."""
        assert self.header is not None
        return self.header.paused_at_ns if self.header.boot_id == _boot_id() else self._switch_started_ns

    def _first_run_ns(self) -> int:
        """The first KVM_RUN here (0: none yet); kept once known, the machine may be gone later."""
        if not self._resume_ns and self.machine is not None:
            self._resume_ns = min((t.first_run_ns for t in self.machine.vcpus if t.first_run_ns), default=0)
        return self._resume_ns

    def downtime_ms(self) -> float | None:
        """Source pause -> first KVM_RUN here; known only where both share a clock (same boot)."""
        if self.header is None or self.header.boot_id != _boot_id():
            return None
        first_run = self._first_run_ns()
        return (first_run - self.header.paused_at_ns) / 1e6 if first_run else None

    def _sample(self, now_ns: int) -> None:
        if self.tracker is not None:
            self.pages_series.add(now_ns, list(self.tracker.counts.values()))
        if self.machine is not None:
            self.progress_series.add(now_ns, (self.machine.services.verified,))

    async def stop_sampling(self) -> None:
        """End the timeline's series here (else they run until close)."""
        await self._sampler.stop()

    def metrics(self) -> dict[str, Any]:
        """This migration's timeline as one JSON-able dict of compact arrays (see
        postcopy/observe/timeline.py); available from the switchover on, and after close."""
        if self.header is None or self.tracker is None:
            raise MigrationError(f"no metrics before the switchover (state {self.state.value})")
        origin = self._origin_ns()
        return build_timeline(
            origin_ns=origin,
            clock="source_pause" if origin == self.header.paused_at_ns else "switchover_request",
            marks_ns={"switchover_request": self._switch_started_ns, "resume": self._first_run_ns() or None,
                      "complete": self._done_ns or None},
            fault_mode=self.fault_mode, vcpus=len(self.header.vcpus), npages=self.tracker.npages,
            fault_logs=self.fault_logs(), pages=self.pages_series, progress=self.progress_series)

    def progress(self) -> DestinationProgress:
        """A snapshot for the control API, read from any thread without locks (counters only grow)."""
        tracker = self.tracker
        total = self.memory.pages if self.memory is not None else 0
        if tracker is None:
            return DestinationProgress(self.state.value, total, 0, {}, 0.0)
        end_ns = self._done_ns or time.monotonic_ns()
        running_s = (end_ns - self._started_ns) / 1e9 if self._started_ns else 0.0
        return DestinationProgress(self.state.value, tracker.npages, tracker.present,
                                   tracker.counts_by_name(), running_s)

    def detach_machine(self) -> Machine:
        """Hand the running guest to a new owner: close() then leaves it running."""
        assert self.machine is not None
        machine, self.machine = self.machine, None
        return machine

    def _unregister_ram(self) -> None:
        """Guest RAM is registered from prepare() to here, not only to COMPLETE (see
        wait_complete). A guest handed to a new owner (detach_machine) keeps running on it:
        every page is present, and from here on its accesses never reach this uffd."""
        if self.uffd is None or self.uffd.fd < 0 or self.memory is None:
            return
        for region in self.memory.regions:
            if region.hva:
                self.uffd.unregister(region.hva, region.size)

    async def close(self) -> None:
        self.retry.abort()  # a vCPU waiting out a backoff gives up now, so it can stop
        if self.machine is not None:
            # Still ours (not handed over): no vCPU may run once its RAM is unregistered below,
            # or a missing page would read as zeros.
            await asyncio.to_thread(self.machine.stop)
        await self._sampler.stop()
        if self.resolver is not None:
            await asyncio.to_thread(self.resolver.close)
        elif self.classic is not None:
            await asyncio.to_thread(self.classic.close)
        else:
            for sync in self._vcpu_connections + self._prefetch_connections:
                await asyncio.to_thread(sync.close)
        for connection in self._background_connections:
            await asyncio.to_thread(connection.close)
        with self._opened_lock:  # and any a cancelled prepare() opened but never handed out
            self._closed = True
        for connection in self._opened:  # closing one closed above again does nothing
            await asyncio.to_thread(connection.close)
        if self._background is not None:  # a cancelled transfer's threads may still be installing
            await asyncio.gather(self._background, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self._unregister_ram()
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        if self.uffd is not None:
            self.uffd.close()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {}
    s = sorted(samples_ns)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] / 1e3  # noqa: E731
    return {"count": len(s), "p50": round(pick(0.5), 1), "p90": round(pick(0.9), 1),
            "p99": round(pick(0.99), 1), "max": round(s[-1] / 1e3, 1)}


def result_dict(result: MigrationResult) -> dict[str, Any]:
    return asdict(result)
