"""The VMM service behind the control API: one process, at most one VM, at most one migration.

It owns the Machine, the source's PageServer (outgoing) and the destination's task (incoming),
and is the only code that changes them; the HTTP layer (server.py) only parses and answers.
Every refusal is an ApiError whose code is the HTTP status: 404 no VM, 409 wrong state.

Migration states, as GET /v1/migration names them:
    source:      listen (page server up, guest runs here) -> serving -> completed | failed
    destination: setup -> listen -> running -> completed | failed
A cancelled migration is failed, with the reason in ``error``.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from postcopy.api.models import ApiError, IncomingSpec, OutgoingSpec, VmSpec
from postcopy.destination.client import FetchError
from postcopy.destination.migration import Destination, DestinationState, MigrationError
from postcopy.destination.run import migrate
from postcopy.observe.prometheus import Registry
from postcopy.source.page_server import MigrationState, PageServer
from postcopy.source import state_dir as states
from postcopy.source.run import boot_workload, server_summary
from postcopy.destination.retry import RetryPolicy
from postcopy.tls import TlsError, client_context, server_context
from proto import MigrationHeader
from proto import PAGE_SIZE
from vmm.guest import workloads
from vmm.guest.workloads import WorkloadError
from vmm.machine import Machine, MachineError
from vmm.memory import GuestMemory
from vmm.vcpu import VcpuError, VcpuState, install_kick_handler

log = logging.getLogger("postcopy.api.service")

SWEEP_TIMEOUT_S: Final = 60.0
CANCELLED: Final = "cancelled by DELETE /v1/migration"
# After Complete the page server stays up this long, so that a destination whose first Complete
# lost its answer on the way back (it retries) gets its 204 instead of a refused connection.
COMPLETE_GRACE_S: Final = 0.2
_SOURCE_STATES: Final = {MigrationState.RUNNING: "listen", MigrationState.SERVING: "serving",
                         MigrationState.COMPLETED: "completed", MigrationState.FAILED: "failed"}
_DEST_STATES: Final = {"new": "setup", "listen": "listen", "running": "running",
                       "complete": "running", "failed": "running"}  # the task's end decides


@dataclass(slots=True)
class Vm:
    machine: Machine
    spec: VmSpec
    origin: str  # "created" (PUT /v1/vm) or "migrated" (arrived by an incoming migration)
    workload: dict[str, int | str]  # the record a migration header carries


@dataclass(slots=True)
class Outgoing:
    server: PageServer
    url: str
    watcher: asyncio.Task[None] | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None
    state_dir: str | None = None  # removed after Complete: the destination has every page
    memory: GuestMemory | None = None  # a resumed server's RAM (no VM owns it)


@dataclass(slots=True)
class Incoming:
    spec: IncomingSpec
    task: asyncio.Task[None] | None = None
    fault_mode: str = ""
    dest: Destination | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def active(self) -> bool:
        return self.task is not None and not self.task.done()


def guest_progress(machine: Machine) -> dict[str, Any]:
    """What the guest reported: pages verified, errors, per vCPU (as the page server's status)."""
    services = machine.services
    vcpus = [{"id": t.id, "state": t.state.value, "verified": p.verified, "errors": p.errors,
              "reports": p.reports, "sweeps": p.sweeps, "sweep_pages": p.sweep_pages,
              "sweep_errors": p.sweep_errors}
             for t, p in zip(machine.vcpus, services.progress)]
    return {"verified": services.verified, "errors": services.errors,
            "exceptions": len(services.exceptions), "vcpu": vcpus}


def _vm_state(machine: Machine) -> str:
    states = {t.state for t in machine.vcpus}
    if VcpuState.FAILED in states:
        return "failed"
    if VcpuState.RUNNING in states or (VcpuState.CREATED in states and machine.started_ns):
        return "running"  # a started vCPU thread is CREATED until its first KVM_RUN
    if states == {VcpuState.PAUSED}:
        return "paused"
    return machine.vcpus[0].state.value


class VmmService:
    """Use from the event loop of the main thread (vCPU threads get their kick signal there)."""

    def __init__(self, console: Callable[[str], None] | None = None) -> None:
        install_kick_handler()  # now, on the main thread, so a VM can start from any thread later
        self.console = console
        # GET /metrics: the destination's and the source's figures of the latest migration.
        self.registry = Registry()
        self.vm: Vm | None = None
        self.outgoing: Outgoing | None = None
        self.incoming: Incoming | None = None
        self.stopping = asyncio.Event()
        self._lock = asyncio.Lock()  # one state change (create, delete, migrate, cancel) at a time

    # -- the VM ---------------------------------------------------------------------------------
    def _need_vm(self) -> Vm:
        if self.vm is None:
            raise ApiError(404, "this VMM has no VM: PUT /v1/vm creates one")
        return self.vm

    def _migrating(self) -> str | None:
        """Why VM control is refused now (a migration in progress), or None."""
        if self.incoming is not None and self.incoming.active:
            return "an incoming migration is in progress"
        if self.outgoing is not None and self.outgoing.watcher is not None and not self.outgoing.watcher.done():
            return f"an outgoing migration is {_SOURCE_STATES[self.outgoing.server.state]}"
        return None

    def _need_idle_vm(self, action: str) -> Vm:
        vm = self._need_vm()
        if (why := self._migrating()) is not None:
            raise ApiError(409, f"cannot {action}: {why}")
        return vm

    def _need_empty(self, action: str, has_vm: str) -> None:
        """Refuse ``action`` (409) while this VMM has a VM (``has_vm`` says why that matters)
        or a migration runs."""
        if self.vm is not None:
            raise ApiError(409, has_vm)
        if (why := self._migrating()) is not None:
            raise ApiError(409, f"cannot {action}: {why}")

    async def create_vm(self, spec: VmSpec) -> dict[str, Any]:
        async with self._lock:
            self._need_empty("create a VM", "this VMM already has a VM (one VM per VMM): DELETE /v1/vm first")
            try:
                ram_path = states.prepare(spec.state_dir) if spec.state_dir else None
                machine, workload = boot_workload(spec.workload, spec.mem_bytes, spec.vcpus, spec.seed,
                                                  ram_path=ram_path, prefill=spec.prefill)
            except (WorkloadError, states.StateDirError) as e:
                raise ApiError(400, f"PUT /v1/vm: {e}") from None
            except MachineError as e:
                raise ApiError(500, f"cannot boot the VM: {e}") from None
            self.vm = Vm(machine, spec, "created", workload)
            log.info("VM created: %d MiB, %d vCPUs, %s", spec.mem_bytes >> 20, spec.vcpus, spec.workload)
        return self.vm_status()

    def vm_status(self) -> dict[str, Any]:
        vm = self._need_vm()
        spec = vm.spec
        return {"state": _vm_state(vm.machine), "origin": vm.origin, "mem": spec.mem_bytes, "vcpus": spec.vcpus,
                "workload": spec.workload, "seed": spec.seed, "guest": guest_progress(vm.machine)}

    async def pause(self) -> dict[str, Any]:
        async with self._lock:
            vm = self._need_idle_vm("pause the VM")
            try:
                await asyncio.to_thread(vm.machine.pause)
            except VcpuError as e:
                raise ApiError(500, str(e)) from None
        return self.vm_status()

    async def resume(self) -> dict[str, Any]:
        async with self._lock:
            vm = self._need_idle_vm("resume the VM")
            if failures := vm.machine.failures():
                raise ApiError(409, f"cannot resume a failed VM: {'; '.join(failures)}")
            vm.machine.resume()
        return self.vm_status()

    async def sweep(self) -> dict[str, Any]:
        """The guest checks all its memory once; under the lock, so no migration starts meanwhile."""
        async with self._lock:
            vm = self._need_idle_vm("sweep the guest")
            known = workloads.WORKLOADS.get(vm.spec.workload)
            if known is None or not known.verifies:
                raise ApiError(409, f"workload {vm.spec.workload} does not verify its memory: nothing to sweep")
            if _vm_state(vm.machine) != "running":
                raise ApiError(409, f"cannot sweep the guest while the VM is {_vm_state(vm.machine)}")
            services = vm.machine.services
            finished = await asyncio.to_thread(services.sweep, SWEEP_TIMEOUT_S)
            pages = sum(p.sweep_pages for p in services.progress)
            errors = sum(p.sweep_errors for p in services.progress)
        return {"ok": finished and errors == 0, "finished": finished, "pages": pages, "errors": errors}

    async def delete_vm(self) -> None:
        async with self._lock:
            self._need_idle_vm("delete the VM")
            await self._release_vm()

    async def _release_vm(self) -> None:
        if self.vm is not None:
            vm, self.vm = self.vm, None
            await asyncio.to_thread(vm.machine.close)

    # -- outgoing (the source) ------------------------------------------------------------------
    async def start_outgoing(self, spec: OutgoingSpec) -> dict[str, Any]:
        async with self._lock:
            try:
                tls = server_context(spec.tls_cert, spec.tls_key) if spec.tls_cert and spec.tls_key else None
            except TlsError as e:
                raise ApiError(400, f"PUT /v1/migration/outgoing: {e}") from None
            if spec.resume is not None:
                server, memory, state_dir = await self._resumed_server(spec)
            else:
                server, memory, state_dir = self._new_server(spec), None, self._need_vm().spec.state_dir
            try:
                url = await server.start(spec.host, spec.port, ssl_context=tls)
            except BaseException as e:  # its page workers may be running already: always closed
                await server.close()
                if memory is not None:
                    memory.close()
                if isinstance(e, (OSError, ValueError)):  # ValueError: a host name IDNA refuses
                    raise ApiError(400, f"the page server cannot listen on {spec.host}:{spec.port}: {e}") from None
                raise
            out = Outgoing(server, spec.advertise_url or url, state_dir=state_dir, memory=memory)
            out.watcher = asyncio.create_task(self._watch_outgoing(out))
            self.outgoing, self.incoming = out, None
            log.info("outgoing migration %s: page server at %s", server.migration_id, url)
        return self.migration_status()

    def _new_server(self, spec: OutgoingSpec) -> PageServer:
        vm = self._need_idle_vm("start an outgoing migration")
        migration_id = f"mig-{secrets.token_hex(8)}"
        assert spec.token is not None
        token, state_dir = spec.token, vm.spec.state_dir

        def save(header: MigrationHeader, header_bytes: bytes) -> None:
            assert state_dir is not None
            states.save(state_dir, header_bytes, states.ResumeRecord(migration_id, token))
        return PageServer(vm.machine, token=token, migration_id=migration_id, workload=vm.workload,
                          registry=self.registry, on_export=save if state_dir else None,
                          page_workers=spec.page_workers, page_poll_us=spec.page_poll_us)

    async def _resumed_server(self, spec: OutgoingSpec) -> tuple[PageServer, GuestMemory, str]:
        """A page server for a migration past its switchover whose server died: pages come
        straight from the state directory's RAM file; no VM runs here."""
        self._need_empty("resume a migration", "resuming a migration needs a VMM without a VM")
        state_dir = spec.resume
        assert state_dir is not None
        try:
            header, header_bytes, record, memory = await asyncio.to_thread(states.load, state_dir)
        except states.StateDirError as e:
            raise ApiError(400, f"PUT /v1/migration/outgoing: {e}") from None
        server = PageServer.resumed(memory, header, header_bytes, token=record.token, registry=self.registry,
                                    page_workers=spec.page_workers, page_poll_us=spec.page_poll_us)
        return server, memory, state_dir

    async def _watch_outgoing(self, out: Outgoing) -> None:
        try:
            await self._serve_outgoing(out)
        finally:  # also when cancelled: a resumed server's RAM mapping is ours to release,
            if out.memory is not None:  # once no page socket can send from it any more
                await out.server.close()
                out.memory.close()
                out.memory = None

    async def _serve_outgoing(self, out: Outgoing) -> None:
        state = await out.server.wait()
        if state is MigrationState.COMPLETED:
            out.summary = server_summary(out.server)
            if out.state_dir is not None:  # the destination has every page: give the RAM file back
                states.remove(out.state_dir)
            await asyncio.sleep(COMPLETE_GRACE_S)
        else:
            out.error = out.server.failure
        await out.server.close()  # every page socket closed: now the guest's RAM may go
        if state is MigrationState.COMPLETED:
            await self._release_vm()  # the guest lives on the destination now
        log.info("outgoing migration %s ended %s", out.server.migration_id, state.value)

    # -- incoming (the destination) -------------------------------------------------------------
    async def start_incoming(self, spec: IncomingSpec) -> dict[str, Any]:
        async with self._lock:
            self._need_empty("start an incoming migration",
                             "this VMM already has a VM: an incoming migration needs an empty VMM")
            inc = Incoming(spec)
            inc.task = asyncio.create_task(self._run_incoming(inc))
            self.incoming, self.outgoing = inc, None
        return self.migration_status()

    async def _run_incoming(self, inc: Incoming) -> None:
        spec = inc.spec
        try:
            inc.fault_mode = spec.fault_mode
            if inc.fault_mode == "auto":
                from postcopy import doctor
                inc.fault_mode = (await asyncio.to_thread(doctor.diagnose)).recommended_fault_mode
            before = spec.source_check.as_dict() if spec.source_check is not None else None

            def watch(dest: Destination) -> None:
                inc.dest = dest

            def adopt(machine: Machine) -> None:
                assert inc.dest is not None and inc.dest.header is not None
                w = inc.dest.header.workload
                vm_spec = VmSpec(machine.memory.size, len(machine.vcpus), str(w.get("name", "memtouch")),
                                 int(w.get("seed", 0)))
                self.vm = Vm(machine, vm_spec, "migrated", dict(w))

            inc.report = await migrate(spec.source_url, spec.token, inc.fault_mode,  # type: ignore[arg-type]
                                       after_s=spec.after_s, before=before, readahead_base=spec.readahead,
                                       readahead_max=spec.readahead_max,
                                       console=self.console, on_destination=watch, adopt=adopt,
                                       timeline=spec.timeline, registry=self.registry, vcpu_nice=spec.vcpu_nice,
                                       ssl_context=client_context(spec.tls_ca) if spec.tls_ca else None,
                                       retry=RetryPolicy(deadline_s=spec.retry_deadline_s)
                                       if spec.retry_deadline_s is not None else None)
            log.info("incoming migration completed: verified %s", inc.report["verified"])
        except asyncio.CancelledError:
            inc.error = CANCELLED
        except (MigrationError, FetchError, MachineError, VcpuError, TlsError, OSError) as e:
            inc.error = str(e)
            log.error("incoming migration failed: %s", e)
        except Exception as e:
            inc.error = f"internal error: {type(e).__name__}: {e}"
            log.exception("incoming migration failed")

    # -- the migration, either side -------------------------------------------------------------
    def migration_status(self) -> dict[str, Any]:
        if self.outgoing is not None:
            return self._outgoing_status(self.outgoing)
        if self.incoming is not None:
            return self._incoming_status(self.incoming)
        return {"role": "none", "state": "none"}

    def _outgoing_status(self, out: Outgoing) -> dict[str, Any]:
        server = out.server
        stats = server.stats()
        state = _SOURCE_STATES[server.state]
        if state == "completed" and out.summary is None:
            state = "serving"  # completed once its summary is made: a poller reads both at once
        if out.error is not None and state != "completed":
            state = "failed"
        header = server.header
        total = header.total_pages if header is not None else server.machine.memory.pages
        elapsed_s = (time.monotonic_ns() - stats["started_ns"]) / 1e9 if stats["started_ns"] else 0.0
        if stats.get("pause_to_complete_s") is not None:
            elapsed_s = stats["pause_to_complete_s"]
        sent = stats["pages_data"] + stats["pages_zero"]
        return {
            "role": "source", "state": state, "migration_id": server.migration_id, "url": out.url,
            "pages_total": total, "pages_sent": sent,
            "pages": {"data": stats["pages_data"], "zero": stats["pages_zero"]},
            "requests": stats["requests"], "bytes": stats["batch_bytes"] + stats["header_bytes"],
            "rate": round(sent / elapsed_s, 1) if elapsed_s > 0 else 0.0,
            "total_ms": round(elapsed_s * 1e3, 3) if stats["started_ns"] else None,
            "errors": [out.error] if out.error else [],
            "error_replies": stats["errors"],
            "report": out.summary,
        }

    def _incoming_status(self, inc: Incoming) -> dict[str, Any]:
        status: dict[str, Any] = {"role": "destination", "source_url": inc.spec.source_url,
                                  "fault_mode": inc.fault_mode or inc.spec.fault_mode}
        dest = inc.dest
        progress = dest.progress() if dest is not None else None
        if inc.active:
            status["state"] = _DEST_STATES[progress.state] if progress is not None else "setup"
        else:
            status["state"] = "completed" if inc.report is not None else "failed"
        if dest is not None and dest.header is not None:
            status["migration_id"] = dest.header.migration_id
        report = inc.report
        if progress is not None and progress.pages_total:
            fetched = progress.pages_present - progress.pages.get("eager", 0)
            rate = fetched / progress.running_s if progress.running_s > 0 else 0.0
            remaining = progress.pages_total - progress.pages_present
            from_source = sum(n for kind, n in progress.pages.items() if kind != "zero")
            status.update({
                "pages_total": progress.pages_total, "pages_present": progress.pages_present,
                "pages_remaining": remaining, "pages": progress.pages, "bytes": from_source * PAGE_SIZE,
                "rate": round(rate, 1),
                "eta_s": round(remaining / rate, 3) if rate > 0 and remaining else (0.0 if not remaining else None),
            })
        status.update({
            "downtime_ms": report["downtime_ms"] if report else None,
            "total_ms": report["total_ms"] if report else None,
            "errors": ([inc.error] if inc.error else []) + (report["failures"] if report else []),
            "report": report,
        })
        return status

    async def cancel_migration(self) -> dict[str, Any]:
        async with self._lock:
            inc, out = self.incoming, self.outgoing
            if inc is not None and inc.active:
                assert inc.task is not None
                if inc.dest is not None and inc.dest.state is DestinationState.COMPLETE:
                    # The source has heard Complete and let its copy go: this guest is the only one.
                    raise ApiError(409, "the migration is complete: the guest runs here now and the source "
                                        "has released its copy (it is being checked before it is adopted)")
                inc.task.cancel()
                await asyncio.gather(inc.task, return_exceptions=True)
                inc.error = CANCELLED  # the destination's guest is stopped and discarded
            elif out is not None and out.watcher is not None and not out.watcher.done():
                if out.server.state is not MigrationState.RUNNING:
                    raise ApiError(409, f"the migration is {_SOURCE_STATES[out.server.state]}: a destination "
                                        "has started it and the guest runs there now")
                out.watcher.cancel()
                await asyncio.gather(out.watcher, return_exceptions=True)
                await out.server.close()
                out.error = CANCELLED  # the guest keeps running here
            else:
                raise ApiError(409, "no migration in progress")
        return self.migration_status()

    # -- the whole service ----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {"status": "ok", "vm": _vm_state(self.vm.machine) if self.vm is not None else "none",
                "migration": self.migration_status()["state"]}

    async def close(self) -> None:
        """Stop everything this service owns: the migration, the page server, the VM."""
        if self.incoming is not None and self.incoming.task is not None:
            self.incoming.task.cancel()
            await asyncio.gather(self.incoming.task, return_exceptions=True)
        if self.outgoing is not None:
            if self.outgoing.watcher is not None:
                if self.outgoing.server.state is not MigrationState.COMPLETED:
                    self.outgoing.watcher.cancel()  # else it ends by itself, after the grace
                await asyncio.gather(self.outgoing.watcher, return_exceptions=True)
            await self.outgoing.server.close()
        await self._release_vm()
