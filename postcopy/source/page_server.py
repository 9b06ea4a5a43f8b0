"""The source's page server: exports the paused guest once, then serves its pages over a
WebSocket until the destination says it has them all.

States: RUNNING (the guest runs here) -> SERVING (paused, header exported) -> COMPLETED;
FAILED if the export itself fails. A request that does not fit the state is refused with 409.
Every error is an ErrorReply (msgpack), as an HTTP body or as a WebSocket frame.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Self

from aiohttp import WSCloseCode, web

from postcopy.observe.collect import register_source
from postcopy.observe.prometheus import Registry, metrics_handler
from postcopy.observe.series import Sampler, Series
from postcopy.source.answers import Board, Counts, MigrationState, PageAnswerer, error_body
from postcopy.source.export import ExportError, export, zero_map
from postcopy.source.page_socket import PageSocket, ServedSocket, ThreadedPageSocket, WorkerPageSocket
from postcopy.source.page_workers import DEFAULT_POLL_US, MAX_POLL_US, PageWorkers
from proto import REQUEST_KINDS, Complete, MigrationHeader, ProtoError
from proto.version import MAX_COMPLETE_MESSAGE_BYTES
from vmm.machine import Machine
from vmm.memory import GuestMemory, GuestMemoryError

__all__ = ["MSGPACK", "MigrationState", "PageServer", "ServerStats", "make_app"]

log = logging.getLogger("postcopy.source.page_server")

MSGPACK: Final = "application/x-msgpack"
# A frame above this closes the socket (1009, aiohttp's reader); one between it and
# MAX_REQUEST_MESSAGE_BYTES gets a 413 ErrorReply and the socket stays usable.
WS_MAX_FRAME_BYTES: Final = 64 * 1024
# HTTP request bodies: the largest is a Complete.
MAX_BODY_BYTES: Final = MAX_COMPLETE_MESSAGE_BYTES
SWEEP_TIMEOUT_S: Final = 60.0
SOCKET_CLOSE_TIMEOUT_S: Final = 1.0
# The guest's progress is sampled this often while it runs here, for the destination's timeline.
PROGRESS_INTERVAL_S: Final = 0.02
# From the switchover on, the GIL is handed between threads this often (the default is 5 ms):
# the zero map is built on an executor thread while the loop answers the resumed guest's faults.
SERVING_SWITCH_INTERVAL_S: Final = 0.0002

SERVED_BY: Final = {WorkerPageSocket: "worker", ThreadedPageSocket: "thread", PageSocket: "loop"}
_AUTH: Final = web.AppKey("auth", bytes)
_SERVER: Final = web.AppKey("server", "PageServer")


@dataclass(slots=True)
class ServerStats:
    """Counters for the report, kept on the event loop; the page sockets count their own
    answers on the board (answers.Counts), which stats() adds in."""

    pages_data: int = 0  # pages sent with their contents
    pages_zero: int = 0  # pages flagged zero, not sent
    batch_bytes: int = 0  # encoded PageBatch bytes sent
    header_bytes: int = 0
    zero_map_pages: int = 0  # pages the zero map marks zero (0 until it is built)
    ws_connections: int = 0
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(sorted(REQUEST_KINDS), 0))
    errors: dict[int, int] = field(default_factory=dict)  # by status code, HTTP and WebSocket
    started_ns: int = 0  # CLOCK_MONOTONIC: the pause (the header's paused_at_ns)
    completed_ns: int = 0


class PageServer:
    """Serves one migration of `machine`. Use as ``async with PageServer(...) as s: await s.start(...)``.

    Serving pages needs only guest RAM and the header: the machine is needed until the
    switchover (export, status, sweep). ``resumed`` builds a server without one, from a state
    directory, after the first server died. ``on_export`` is called with the header before it
    is answered (the state directory saves it there)."""

    def __init__(self, machine: Machine | None, *, token: str, migration_id: str,
                 workload: dict[str, int | str], sweep_timeout_s: float = SWEEP_TIMEOUT_S,
                 memory: GuestMemory | None = None,
                 on_export: Callable[[MigrationHeader, bytes], None] | None = None,
                 registry: Registry | None = None, page_workers: bool = True,
                 page_poll_us: int = DEFAULT_POLL_US) -> None:
        if not 0 <= page_poll_us <= MAX_POLL_US:
            raise ValueError(f"page_poll_us must be 0 to {MAX_POLL_US}, not {page_poll_us}")
        self.machine = machine
        memory = memory if memory is not None else machine.memory if machine is not None else None
        if memory is None:
            raise ValueError("a page server needs a machine or guest memory to serve")
        self.memory = memory
        self.on_export = on_export
        self.migration_id = migration_id
        self.workload = workload
        self.sweep_timeout_s = sweep_timeout_s
        self.state = MigrationState.RUNNING
        # The state as page sockets read it, wherever they run (a worker process, answers.py).
        self._board = Board.create()
        self._board.set_state(self.state.value)
        self.completed = asyncio.Event()
        self._ended = asyncio.Event()  # COMPLETED or FAILED
        self.header: MigrationHeader | None = None
        self.complete_stats: dict[str, int] = {}
        self._token = f"Bearer {token}".encode()
        self._header_bytes = b""
        # The encoded ZeroMap, built once on the first GET /v1/migration/zero-map.
        self._zero_map: asyncio.Future[tuple[bytes, int]] | None = None
        self._failure = ""
        self._transition = asyncio.Lock()  # start and sweep: one at a time
        self._stats = ServerStats()
        self._sockets: dict[ServedSocket, int] = {}  # each with its slot on the board
        self._closed_counts = [0] * len(Counts.FIELDS)  # sockets already closed, added up
        # One view of each region of guest RAM, sliced per request (no copy), valid until the
        # machine closes, which its owner does after close().
        self._spans = [(r.gpa, r.end, memory.view(r.gpa, r.size)) for r in memory.regions]
        # Plain TCP page sockets served by page workers, a process each (page_workers.py): only
        # where guest RAM is a memfd or a file, which the workers map themselves.
        self.page_workers = page_workers and memory.backing in ("memfd", "file")
        # How long a page worker polls for the next request, on a socket whose client asks
        # (?poll=1: a destination's vCPU that polls for its answers; page_workers.py).
        self.page_poll_us = page_poll_us
        self._workers: PageWorkers | None = None
        self._runner: web.AppRunner | None = None
        self.progress = Series(["verified"])
        self._sampler = Sampler(PROGRESS_INTERVAL_S, self._sample_progress)
        self.registry = registry if registry is not None else Registry()
        register_source(self.registry, self)

    @classmethod
    def resumed(cls, memory: GuestMemory, header: MigrationHeader, header_bytes: bytes, *, token: str,
                registry: Registry | None = None, page_workers: bool = True,
                page_poll_us: int = DEFAULT_POLL_US) -> PageServer:
        """A server for a migration already past its switchover: SERVING at once, no machine."""
        server = cls(None, token=token, migration_id=header.migration_id, workload=dict(header.workload),
                     memory=memory, registry=registry, page_workers=page_workers, page_poll_us=page_poll_us)
        server._serving(header, header_bytes)
        server._to(MigrationState.SERVING, "resumed from its state directory: serving from the RAM file")
        return server

    def _serving(self, header: MigrationHeader, header_bytes: bytes) -> None:
        self.header, self._header_bytes = header, header_bytes
        self._stats.started_ns = header.paused_at_ns
        self._stats.header_bytes = len(header_bytes)

    # -- lifecycle: the whole setup and teardown ------------------------------------------------
    async def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> str:
        """Listen on host:port only (0 picks a free port), with TLS if ``ssl_context`` is
        given; returns the base URL."""
        if self.page_workers and ssl_context is None and self._workers is None:  # TLS: the loop answers
            self._workers = await PageWorkers.start(self._board, self.memory)
        self._runner = web.AppRunner(make_app(self), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        if self.state is MigrationState.RUNNING:  # a resumed server has no guest running here
            self._sampler.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        return f"{'https' if ssl_context is not None else 'http'}://{shown}:{bound_port}"

    async def close(self) -> None:
        """Stop listening and close every WebSocket; guest memory is not touched after this."""
        await self._sampler.stop()
        # Answers still buffered in a transport are views of guest RAM: a socket whose peer
        # does not read them within SOCKET_CLOSE_TIMEOUT_S is aborted (its buffer dropped), so
        # nothing writes from guest RAM once its owner unmaps it.
        sockets = list(self._sockets)
        for socket in sockets:
            socket.close(WSCloseCode.GOING_AWAY, "server shutdown")
        if sockets:
            await asyncio.wait([s.closed for s in sockets], timeout=SOCKET_CLOSE_TIMEOUT_S)
            for socket in sockets:
                socket.abort()
            # A socket's thread may still be in the send that abort() ended: wait until it has
            # let go of guest RAM.
            await asyncio.wait([s.closed for s in sockets], timeout=SOCKET_CLOSE_TIMEOUT_S)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()  # runs on_shutdown: closes the sockets
        if self._workers is not None:  # no page socket is left for a worker to serve
            workers, self._workers = self._workers, None
            await workers.close()
        self._board.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _close_sockets(self, app: web.Application) -> None:
        for socket in list(self._sockets):
            socket.close(WSCloseCode.GOING_AWAY, "server shutdown")

    async def wait(self) -> MigrationState:
        """Until the migration completes or fails; returns that state."""
        await self._ended.wait()
        return self.state

    @property
    def failure(self) -> str:
        """Why the export failed (state FAILED), else empty."""
        return self._failure

    def stats(self) -> dict[str, Any]:
        stats = asdict(self._stats)
        counts = list(self._closed_counts)
        for slot in self._sockets.values():
            Counts.add(counts, self._board.counts(slot).tolist())
        answered = Counts.as_stats(counts)
        for key in ("pages_data", "pages_zero", "batch_bytes"):
            stats[key] += answered[key]
        for kind, n in answered["requests"].items():  # type: ignore[attr-defined]
            stats["requests"][kind] += n
        for code, n in answered["errors"].items():  # type: ignore[attr-defined]
            stats["errors"][code] = stats["errors"].get(code, 0) + n
        stats["state"] = self.state.value
        stats["errors"] = {str(code): n for code, n in stats["errors"].items()}
        stats["page_sockets"] = self.page_sockets()
        if self._stats.completed_ns:
            stats["pause_to_complete_s"] = (self._stats.completed_ns - self._stats.started_ns) / 1e9
        return stats

    def page_sockets(self) -> dict[str, int]:
        """The page sockets open now, by what serves them: a page worker, a thread of this
        process, or the event loop (TLS)."""
        by = dict.fromkeys(SERVED_BY.values(), 0)
        for socket in self._sockets:
            by[SERVED_BY[type(socket)]] += 1
        return by

    def _to(self, new: MigrationState, why: str, *args: object, level: int = logging.INFO, **fields: object) -> None:
        """The one place the state changes: one structured log event per transition."""
        log.log(level, "migration %s: %s -> %s: " + why, self.migration_id, self.state.value, new.value, *args,
                extra={"event": "state", "side": "source", "migration_id": self.migration_id,
                       "from": self.state.value, "to": new.value, **fields})
        self.state = new
        self._board.set_state(new.value)

    def _sample_progress(self, now_ns: int) -> None:
        if self.state is MigrationState.RUNNING:
            self.progress.add(now_ns, (self.machine.services.verified,))

    # -- replies --------------------------------------------------------------------------------
    def error(self, code: int, message: str) -> web.Response:
        self._stats.errors[code] = self._stats.errors.get(code, 0) + 1
        return web.Response(status=code, body=error_body(code, message), content_type=MSGPACK)

    def _no_guest(self) -> web.Response:
        return self.error(409, "no guest here: this page server resumed a migration from its state directory")

    def _wrong_state(self, action: str) -> web.Response:
        why = f": {self._failure}" if self._failure else ""
        return self.error(409, f"cannot {action} while the migration is {self.state.value}{why}")

    # -- handlers -------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"state": self.state.value})

    async def start_migration(self, request: web.Request) -> web.Response:
        async with self._transition:
            if self.state is MigrationState.RUNNING:
                assert self.machine is not None  # only a resumed server has none, and it is SERVING
                try:
                    # On the event loop itself, not an executor: it is downtime from the pause
                    # on (~1-2 ms), and a hop back to the loop from another thread costs a
                    # wake-up that a busy host delays. Nothing else is served meanwhile: no
                    # page is until this returns.
                    header = export(self.machine, self.migration_id, self.workload)
                    header_bytes = header.encode()
                    if self.on_export is not None:  # file I/O (a state directory): off the loop
                        await asyncio.get_running_loop().run_in_executor(None, self.on_export, header, header_bytes)
                except (ExportError, OSError) as error:
                    self._failure = str(error)
                    self._to(MigrationState.FAILED, "%s", error, level=logging.ERROR, error=str(error))
                    self._ended.set()
                    return self.error(500, str(error))
                self._serving(header, header_bytes)
                sys.setswitchinterval(SERVING_SWITCH_INTERVAL_S)
                # Samples taken while the export ran saw a paused guest: the series ends at the pause.
                self.progress.cut_after(header.paused_at_ns)
                self.progress.add(header.paused_at_ns, (self.machine.services.verified,))
                self._to(MigrationState.SERVING, "guest paused, header of %d bytes (%d eager runs)",
                         len(self._header_bytes), len(header.eager), header_bytes=len(self._header_bytes))
                # Nothing more to sample once the guest is paused; and no timer of this loop
                # takes the GIL from the page sockets' threads while they answer. Not awaited:
                # the header goes out first (a pass of the loop here was 0.1-0.2 ms of downtime).
                self._sampler.cancel()
            if self.state is not MigrationState.SERVING:
                return self._wrong_state("start")
        return web.Response(body=self._header_bytes, content_type=MSGPACK)

    async def zero_map(self, request: web.Request) -> web.Response:
        """The ZeroMap, built on the first request after the switchover (the destination asks
        once its guest runs), off the event loop so pages are served meanwhile; then cached."""
        if self.state is not MigrationState.SERVING:
            return self._wrong_state("send the zero map")
        if self._zero_map is None:
            self._zero_map = asyncio.get_running_loop().run_in_executor(None, self._build_zero_map)
        built = self._zero_map
        try:
            body, self._stats.zero_map_pages = await asyncio.shield(built)
        except (GuestMemoryError, OSError, ProtoError) as error:
            if self._zero_map is built:
                self._zero_map = None  # the next request tries again
            return self.error(500, f"cannot build the zero map: {error}")
        return web.Response(body=body, content_type=MSGPACK)

    def _build_zero_map(self) -> tuple[bytes, int]:
        """The encoded ZeroMap and how many pages it marks."""
        assert self.header is not None  # SERVING
        message = zero_map(self.memory, self.header)
        return message.encode(), int.from_bytes(message.zero_bitmap, "little").bit_count()

    async def complete_migration(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            message = Complete.decode(body)
        except ProtoError as error:
            return self.error(400, str(error))
        if message.migration_id != self.migration_id:
            return self.error(409, f"Complete for migration {message.migration_id!r}, "
                                   f"this server serves {self.migration_id!r}")
        if self.state is MigrationState.COMPLETED:
            return web.Response(status=204)  # a retried Complete
        if self.state is not MigrationState.SERVING:
            return self._wrong_state("complete")
        self.complete_stats = message.stats
        self._stats.completed_ns = time.monotonic_ns()
        self._to(MigrationState.COMPLETED, "destination has every page: %s", message.stats,
                 destination_stats=message.stats)
        self.completed.set()
        self._ended.set()
        return web.Response(status=204)

    async def vm_status(self, request: web.Request) -> web.Response:
        if self.machine is None:
            return self._no_guest()
        services = self.machine.services
        vcpus = [
            {"id": thread.id, "state": thread.state.value, "verified": p.verified, "errors": p.errors,
             "reports": p.reports, "sweeps": p.sweeps, "sweep_pages": p.sweep_pages,
             "sweep_errors": p.sweep_errors}
            for thread, p in zip(self.machine.vcpus, services.progress)
        ]
        return web.json_response({
            "state": self.state.value, "guest_bytes": self.machine.memory.size, "vcpu_count": len(self.machine.vcpus),
            "verified": services.verified, "errors": services.errors,
            "exceptions": len(services.exceptions), "vcpus": vcpus,
        })

    async def vm_progress(self, request: web.Request) -> web.Response:
        """The guest's progress while it ran here, sampled every PROGRESS_INTERVAL_S, in ms from
        the pause (from now, while it still runs): two hosts' clocks never meet."""
        paused = self.header is not None
        origin = self.header.paused_at_ns if self.header is not None else time.monotonic_ns()
        return web.json_response({"clock": "pause" if paused else "now",
                                  "interval_ms": PROGRESS_INTERVAL_S * 1e3, **self.progress.as_dict(origin)})

    async def vm_sweep(self, request: web.Request) -> web.Response:
        async with self._transition:
            if self.state is not MigrationState.RUNNING:
                return self._wrong_state("sweep the guest")
            if self.machine is None:
                return self._no_guest()
            services = self.machine.services
            loop = asyncio.get_running_loop()
            finished = await loop.run_in_executor(None, services.sweep, self.sweep_timeout_s)
            pages = sum(p.sweep_pages for p in services.progress)
            errors = sum(p.sweep_errors for p in services.progress)
        return web.json_response({"ok": finished and errors == 0, "finished": finished,
                                  "pages": pages, "errors": errors})

    async def pages_ws(self, request: web.Request) -> web.StreamResponse:
        # A destination opens its sockets before it asks for the switchover (so connecting is
        # not downtime); pages are served only once the guest is paused here.
        if self.state not in (MigrationState.RUNNING, MigrationState.SERVING):
            return self._wrong_state("serve pages")
        # Other query parameters are ignored (a later destination may send more); poll is 0 or 1.
        polls = request.query.getall("poll", ["0"])
        if polls not in (["0"], ["1"]):
            return self.error(400, "a page socket's query parameter poll is 0 or 1, once")
        slot = self._board.take_slot()
        if slot is None:
            return self.error(503, f"too many page sockets at once (at most {Board.MAX_SLOTS})")
        try:
            socket, ws = await self._take_over(request, slot, self.page_poll_us if polls == ["1"] else 0)
        except BaseException:
            self._board.give_back(slot)
            raise
        self._sockets[socket] = slot
        self._stats.ws_connections += 1
        try:
            await socket.closed
        finally:
            if not socket.closed.done():  # this handler was cancelled: its socket goes with it
                socket.abort()
            del self._sockets[socket]
            Counts.add(self._closed_counts, self._board.counts(slot).tolist())
            if socket.closed.done():  # else its server may still count there: the slot stays taken
                self._board.give_back(slot)
        return ws

    async def _take_over(self, request: web.Request, slot: int,
                         poll_us: int) -> tuple[ServedSocket, web.WebSocketResponse]:
        """Answer the upgrade and hand the connection to what serves it from then on (the fast
        paths of page_socket.py, not aiohttp's reader): a page worker where there are workers
        (polling ``poll_us`` for each next request), a thread of this process where not, the
        event loop's callback for TLS."""
        ws = web.WebSocketResponse(heartbeat=None, compress=False, max_msg_size=WS_MAX_FRAME_BYTES)
        transport = request.transport
        assert transport is not None
        plain = transport.get_extra_info("sslcontext") is None and transport.get_extra_info("socket") is not None
        answerer = PageAnswerer(self._board, slot, self._spans)
        if plain and self._workers is not None and self._workers.alive and ws.can_prepare(request).ok:
            # The worker runs before the 101 goes out: a destination that has its socket is
            # served, and no worker starts while the source pauses (it is forked on this
            # host's CPUs). It reads nothing until a request comes, which follows the 101.
            worker = WorkerPageSocket(transport, self._board, slot)
            if await self._workers.serve(worker, slot, WS_MAX_FRAME_BYTES, poll_us):
                try:
                    await ws.prepare(request)
                except BaseException:
                    worker.abort()  # and wait until it no longer counts in its slot
                    await asyncio.wait([worker.closed], timeout=SOCKET_CLOSE_TIMEOUT_S)
                    raise
                return worker, ws
            worker.release()
        await ws.prepare(request)
        # A thread may write to the connection only once the loop has nothing of its own left
        # to write there (the 101 has gone out: it has, unless the socket is already stuck).
        if plain and not transport.get_write_buffer_size():
            return ThreadedPageSocket.take_over(transport, answerer, max_frame=WS_MAX_FRAME_BYTES), ws
        return PageSocket.take_over(transport, answerer, max_frame=WS_MAX_FRAME_BYTES), ws


# -- the application: middlewares and routes ----------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS: Final = frozenset({"/v1/health"})


@web.middleware
async def _errors_as_replies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (404, 405, 413 body too large) and any bug become ErrorReplies."""
    server = request.app[_SERVER]
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return server.error(error.status, error.reason)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return server.error(500, f"internal error in {request.method} {request.path}")


@web.middleware
async def _bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, request.app[_AUTH]):
        response = request.app[_SERVER].error(401, "missing or wrong bearer token")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    return await handler(request)


def make_app(server: PageServer) -> web.Application:
    app = web.Application(middlewares=[_errors_as_replies, _bearer_auth], client_max_size=MAX_BODY_BYTES)
    app[_SERVER] = server
    app[_AUTH] = server._token
    app.add_routes([
        web.get("/v1/health", server.health),
        web.post("/v1/migration/start", server.start_migration),
        web.get("/v1/migration/zero-map", server.zero_map),
        web.get("/v1/pages/ws", server.pages_ws),
        web.post("/v1/migration/complete", server.complete_migration),
        web.get("/v1/vm/status", server.vm_status),
        web.post("/v1/vm/sweep", server.vm_sweep),
        web.get("/v1/vm/progress", server.vm_progress),
        # Behind the bearer token like the rest: the counts tell how far a migration got.
        web.get("/metrics", metrics_handler(server.registry)),
    ])
    app.on_shutdown.append(server._close_sockets)
    return app
