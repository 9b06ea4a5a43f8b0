"""The destination side of one post-copy migration, as an explicit state machine:

    NEW --prepare--> LISTEN --switchover--> RUNNING --all pages present--> COMPLETE
      (any state) --error--> FAILED

LISTEN: the VM exists and its RAM is registered with userfaultfd, empty. switchover: ask the
source to pause (its answer is the header), install the eager set, restore state, start the
vCPUs. RUNNING: faults are served (exit or classic mode) and the background transfer pulls the
rest. COMPLETE: every page present, the source told to release the guest (RAM stays registered
with userfaultfd until close). The guest never stops.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

import aiohttp

from postcopy.destination.background import run_background
from postcopy.destination.classic_mode import ClassicHandler
from postcopy.destination.client import FetchError, PageConnection, SyncPageConnection, auth_headers, start_migration
from postcopy.destination.exit_mode import ExitModeResolver
from postcopy.destination.install import Installer
from postcopy.destination.pages import Arrival, PageTracker
from proto import Complete, MigrationHeader
from vmm import state as vmstate
from vmm.abi.userfaultfd import UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_SIGBUS
from vmm.machine import Machine, MachineConfig
from vmm.memory import GuestMemory
from vmm.uffd import Uffd, UffdError

log = logging.getLogger("postcopy.destination")
FaultMode = Literal["exit", "classic"]
# The GIL is handed between threads every switch interval: a vCPU thread back from KVM_RUN
# must not wait 5 ms (the default) behind the background transfer.
SWITCH_INTERVAL_S = 0.0002


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


class Destination:
    def __init__(self, source_url: str, token: str, *, fault_mode: FaultMode = "exit",
                 readahead_base: int = 4, readahead_max: int = 256, background: bool = True,
                 console: Callable[[str], None] | None = None) -> None:
        self.source_url = source_url.rstrip("/")
        self.token = token
        self.fault_mode = fault_mode
        self.readahead_base = readahead_base
        self.readahead_max = readahead_max
        self.background = background
        self.console = console
        self.state = DestinationState.NEW
        self.machine: Machine | None = None
        self.memory: GuestMemory | None = None
        self.uffd: Uffd | None = None
        self.tracker: PageTracker | None = None
        self.installer: Installer | None = None
        self.resolver: ExitModeResolver | None = None
        self.classic: ClassicHandler | None = None
        self.header: MigrationHeader | None = None
        self._connections: list[PageConnection] = []
        self._session: aiohttp.ClientSession | None = None
        self._vcpu_connections: list[SyncPageConnection] = []
        self._background_connection: SyncPageConnection | None = None
        self.error: str | None = None

    def _to(self, new: DestinationState) -> None:
        if new not in _ALLOWED[self.state]:
            raise MigrationError(f"destination cannot go from {self.state.value} to {new.value}")
        log.info("destination: %s -> %s", self.state.value, new.value)
        self.state = new

    # -- LISTEN --------------------------------------------------------------------------------
    async def prepare(self, mem_bytes: int, vcpus: int) -> None:
        """Build the VM with empty, registered RAM and open every connection, before the source
        pauses: none of this is downtime."""
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        features = UFFD_FEATURE_SIGBUS if self.fault_mode == "exit" else 0
        try:
            self.uffd = Uffd(features | UFFD_FEATURE_MISSING_SHMEM)
        except UffdError as e:
            self._to(DestinationState.FAILED)
            raise MigrationError(f"cannot open userfaultfd for fault mode {self.fault_mode}: {e}") from None
        self.memory = GuestMemory.create(mem_bytes, "anon", "postcopy-dest")
        for region in self.memory.regions:
            self.uffd.register(region.hva, region.size)
        self.machine = Machine.create(MachineConfig(mem_bytes, vcpus), console=self.console, memory=self.memory)
        self._session = aiohttp.ClientSession()
        if self.fault_mode == "exit":
            self._vcpu_connections = list(await asyncio.gather(
                *(asyncio.to_thread(SyncPageConnection, self.source_url, self.token) for _ in range(vcpus))))
        self._background_connection = await asyncio.to_thread(SyncPageConnection, self.source_url, self.token)
        if self.fault_mode == "classic":  # the fault handler's own connection
            c = PageConnection(self.source_url, self.token)
            await c.connect()
            self._connections.append(c)
        self._to(DestinationState.LISTEN)

    # -- RUNNING -------------------------------------------------------------------------------
    async def switchover(self) -> None:
        assert self.machine and self.memory and self.uffd and self._session
        t0 = time.monotonic_ns()
        self._switch_started_ns = t0
        header, self.header_bytes = await start_migration(self._session, self.source_url, self.token)
        self.header = header
        if [(r.gpa, r.size) for r in header.regions] != [(r.gpa, r.size) for r in self.memory.regions]:
            raise MigrationError(f"source memory layout {header.regions} differs from the one prepared here")
        if len(header.vcpus) != len(self.machine.vcpus):
            raise MigrationError(f"source has {len(header.vcpus)} vCPUs, this VM {len(self.machine.vcpus)}")
        self.tracker = PageTracker(self.memory, header.zero_bitmap)
        self.installer = Installer(self.uffd, self.memory, self.tracker, wake=self.fault_mode == "classic")
        for run in header.eager:
            self.installer.install_run(run.gpa, run.data, Arrival.EAGER)
        vmstate.restore(self.machine, header.vcpus, header.vm_state, header.devices)
        if self.fault_mode == "exit":
            self.resolver = ExitModeResolver(self.installer, readahead_base=self.readahead_base,
                                             readahead_max=self.readahead_max)
            for thread, conn in zip(self.machine.vcpus, self._vcpu_connections):
                self.resolver.prepare(thread, conn)
        else:
            self.classic = ClassicHandler(self.uffd, self.installer, self._connections[0],
                                          readahead_base=self.readahead_base, readahead_max=self.readahead_max)
            self.classic.start()
        self.machine.start()
        self._started_ns = time.monotonic_ns()
        self._to(DestinationState.RUNNING)

    async def wait_complete(self, timeout: float | None = None) -> MigrationResult:
        """Run the background transfer (or wait for demand alone) until every page is present."""
        assert self.tracker and self.machine and self.uffd and self.memory and self.header
        background = asyncio.ensure_future(run_background(self._background_connection, self.installer)) \
            if self.background else None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self.tracker.all_present.is_set():
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
        except (FetchError, MigrationError, UffdError) as e:
            self.error = str(e)
            self._to(DestinationState.FAILED)
            self.machine.pause()  # never run a guest on memory it did not get
            raise MigrationError(f"migration failed while running: {e}") from None
        finally:
            if background is not None and not background.done():
                background.cancel()
        done_ns = time.monotonic_ns()
        # RAM stays registered until close(): a vCPU may still be finishing a fault it took
        # before the last page arrived (the background installed that page meanwhile); its
        # UFFDIO_COPY must meet EEXIST (skipped), not ENOENT from an unregistered range.
        if self.classic is not None:
            self.classic.stop()
        self._to(DestinationState.COMPLETE)
        await self._tell_source(done_ns)
        return self._result(done_ns)

    async def _tell_source(self, done_ns: int) -> None:
        assert self.header and self.tracker and self._session
        stats = {k: v for k, v in self.tracker.counts_by_name().items()}
        msg = Complete(self.header.migration_id, stats)
        try:
            async with self._session.post(f"{self.source_url}/v1/migration/complete", data=msg.encode(),
                                          headers=auth_headers(self.token)) as resp:
                if resp.status >= 300:
                    log.warning("source answered completion with HTTP %d: %s", resp.status, await resp.text())
        except (aiohttp.ClientError, OSError) as e:
            log.warning("could not tell the source the migration is complete: %s", e)

    def _result(self, done_ns: int) -> MigrationResult:
        assert self.header and self.tracker and self.machine
        first_run = min((t.first_run_ns for t in self.machine.vcpus if t.first_run_ns), default=0)
        same_clock = self.header.boot_id == _boot_id()
        downtime = (first_run - self.header.paused_at_ns) / 1e6 if same_clock and first_run else None
        begin = self.header.paused_at_ns if same_clock else self._switch_started_ns
        if self.resolver is not None:
            exit_kinds = self.resolver.exit_kinds()
            latencies = self.resolver.latencies_ns()
            blocktime = {v: ns / 1e6 for v, ns in self.resolver.blocktime_ns().items()}
        else:
            assert self.classic is not None
            exit_kinds = {"uffd": self.classic.faults}
            latencies = list(self.classic.latency_ns)
            blocktime = {}
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
        )

    async def close(self) -> None:
        if self.resolver is not None:
            await asyncio.to_thread(self.resolver.close)
        for c in self._connections:
            await c.close()
        if self._background_connection is not None:
            await asyncio.to_thread(self._background_connection.close)
        for c in self._vcpu_connections:
            if self.resolver is None:
                await asyncio.to_thread(c.close)
        if self._session is not None:
            await self._session.close()
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
