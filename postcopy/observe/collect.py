"""What a migration exposes to Prometheus, read at scrape time from where it is already counted.

One collector per side, registered under "destination" or "source": a later migration in the
same process replaces the earlier one's collector, and its counters start again from zero
(Prometheus reads that as a counter reset)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from postcopy.observe.faultlog import FAULT_KINDS, FaultLog
from postcopy.observe.prometheus import HistogramValue, LATENCY_BUCKETS_S, Family, Registry

if TYPE_CHECKING:
    from postcopy.destination.migration import Destination
    from postcopy.source.page_server import PageServer


def _state_gauge(registry: Registry) -> Family:
    return registry.gauge("postcopy_migration_state", "1 for the state this side of the migration is in",
                          ("side", "state"))


def _set_state(gauge: Family, side: str, states: Iterable[str], current: str) -> None:
    for state in states:
        gauge.set(1 if state == current else 0, side=side, state=state)


class DestinationCollector:
    """Reads a Destination's tracker, fault logs and installer; the latency histogram is fed
    incrementally (each fault observed once, however often it is scraped)."""

    def __init__(self, registry: Registry, dest: Destination) -> None:
        from postcopy.destination.migration import DestinationState
        self.dest = dest
        self.states = [s.value for s in DestinationState]
        self.state = _state_gauge(registry)
        self.faults = registry.counter("postcopy_faults_total", "missing-page faults served, by fault mode and kind",
                                       ("mode", "kind"))
        self.pages = registry.counter("postcopy_pages_total", "guest pages installed here, by how they arrived",
                                      ("arrival",))
        self.missing = registry.gauge("postcopy_pages_missing", "guest pages not yet present here")
        self.received = registry.counter("postcopy_received_bytes_total", "page data installed with UFFDIO_COPY")
        self.errors = registry.counter("postcopy_fetch_errors_total", "page fetches that failed (the migration fails)")
        self.latency = registry.histogram("postcopy_fault_latency_seconds",
                                          "from a fault reaching the VMM to the vCPU going on", ("mode",))
        self.blocktime = registry.counter("postcopy_blocktime_seconds_total",
                                          "time each vCPU spent waiting for pages (post-copy blocktime)", ("vcpu",))
        self.downtime = registry.gauge("postcopy_downtime_seconds", "source pause to first KVM_RUN here")
        for fam in (self.faults, self.pages, self.latency, self.blocktime):
            fam.clear()  # a new migration's series replace the last one's
        self.hist = HistogramValue(LATENCY_BUCKETS_S, [0] * (len(LATENCY_BUCKETS_S) + 1))
        self.seen: dict[int, int] = {}

    def __call__(self) -> None:
        dest = self.dest
        mode = dest.fault_mode
        _set_state(self.state, "destination", self.states, dest.state.value)
        self.errors.set(dest.fetch_errors)
        tracker = dest.tracker
        if tracker is None:
            return
        for name, n in tracker.counts_by_name().items():
            self.pages.set(n, arrival=name)
        self.missing.set(tracker.missing())
        if dest.installer is not None:
            self.received.set(dest.installer.installed_bytes)
        logs = dest.fault_logs()
        for kind in dest.fault_kinds():
            self.faults.set(sum(fl.count(kind) for fl in logs.values()), mode=mode, kind=FAULT_KINDS[kind])
        for vcpu, fl in logs.items():
            self._observe(vcpu, fl)
            if vcpu >= 0:
                self.blocktime.set(fl.blocked_ns / 1e9, vcpu=vcpu)
        self.latency.samples[(mode,)] = self.hist
        downtime_ms = dest.downtime_ms()
        if downtime_ms is not None:
            self.downtime.set(downtime_ms / 1e3)

    def _observe(self, vcpu: int, fl: FaultLog) -> None:
        start, end = self.seen.get(vcpu, 0), len(fl)
        observe = self.hist.observe
        for ns in fl.latency_ns[start:end]:
            observe(ns / 1e9)
        self.seen[vcpu] = end


def register_destination(registry: Registry, dest: Destination) -> None:
    registry.set_collector("destination", DestinationCollector(registry, dest))


def register_source(registry: Registry, server: PageServer) -> None:
    from postcopy.source.page_server import MigrationState
    states = [s.value for s in MigrationState]
    state = _state_gauge(registry)
    pages = registry.counter("postcopy_source_pages_served_total", "pages sent, as data or flagged zero", ("how",))
    sent = registry.counter("postcopy_source_batch_bytes_total", "encoded page-batch bytes sent")
    requests = registry.counter("postcopy_source_requests_total", "page requests answered, by kind", ("kind",))
    errors = registry.counter("postcopy_source_errors_total", "error replies sent, by status code", ("code",))
    header = registry.gauge("postcopy_source_header_bytes", "size of the migration header sent at switchover")
    sockets = registry.gauge("postcopy_source_page_sockets", "page sockets open, by what serves them", ("served_by",))
    verified = registry.gauge("postcopy_guest_pages_verified", "pages the guest has verified (its own count)")

    def collect() -> None:
        stats = server.stats()
        _set_state(state, "source", states, stats["state"])
        pages.set(stats["pages_data"], how="data")
        pages.set(stats["pages_zero"], how="zero")
        sent.set(stats["batch_bytes"])
        for kind, n in stats["requests"].items():
            requests.set(n, kind=kind)
        for code, n in stats["errors"].items():
            errors.set(n, code=code)
        header.set(stats["header_bytes"])
        for served_by, n in stats["page_sockets"].items():
            sockets.set(n, served_by=served_by)
        if server.machine is not None:  # a page server resumed from its state directory has no guest
            verified.set(server.machine.services.verified)
    registry.set_collector("source", collect)
