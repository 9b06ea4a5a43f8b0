"""The control API over HTTP (aiohttp): the app, its routes, and ApiServer, which binds it to a
unix socket or a TCP address. Handlers only parse and answer: VmmService does the work.

Every answer is JSON; every error is ``{"error": "...", "code": N}`` with that HTTP status.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

from aiohttp import web

from postcopy.api.client import ApiClient
from postcopy.api.models import ApiError, IncomingSpec, OutgoingSpec, VmSpec, parse_listen
from postcopy.api.service import VmmService
from postcopy.observe.prometheus import metrics_handler

__all__ = ["ApiAddress", "ApiServer", "ApiStartError", "default_socket_path", "local_vmm", "make_app", "serve"]

log = logging.getLogger("postcopy.api.server")

MAX_BODY_BYTES: Final = 64 * 1024
PUBLIC_PATHS: Final = frozenset({"/v1/health"})
SOCKET_DIR_NAME: Final = "postcopy-vmm"
_SERVICE: Final = web.AppKey("service", VmmService)
_AUTH: Final = web.AppKey("auth", bytes)  # b"" when no API token is set

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiStartError(Exception):
    """The API cannot be served as asked (address in use, TCP without a token, ...)."""


def default_socket_path() -> Path:
    """$XDG_RUNTIME_DIR/postcopy-vmm/api.sock, else /run/postcopy-vmm/api.sock."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/run"
    return Path(base) / SOCKET_DIR_NAME / "api.sock"


@dataclass(slots=True, frozen=True)
class ApiAddress:
    """Where the API listens: ``unix:/path`` or ``tcp:HOST:PORT``."""

    path: Path | None = None
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str | None) -> ApiAddress:
        if not text:
            return cls(path=default_socket_path())
        kind, _, rest = text.partition(":")
        if kind == "unix" and rest:
            return cls(path=Path(rest))
        if kind == "tcp":
            try:
                host, port = parse_listen(rest)
            except ValueError as e:
                raise ApiStartError(f"--api tcp:{rest}: {e}") from None
            return cls(host=host, port=port)
        raise ApiStartError(f"--api wants unix:/path/api.sock or tcp:HOST:PORT, got {text!r}")

    @property
    def is_tcp(self) -> bool:
        return self.path is None


# -- handlers: parse, call the service, answer ---------------------------------------------------

def _service(request: web.Request) -> VmmService:
    return request.app[_SERVICE]


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise ApiError(400, f"{request.method} {request.path}: the body is not valid JSON: {e!s:.200}") from None


async def health(request: web.Request) -> web.Response:
    return web.json_response(_service(request).health())


async def put_vm(request: web.Request) -> web.Response:
    spec = VmSpec.parse(await _body(request))
    return web.json_response(await _service(request).create_vm(spec), status=201)


async def get_vm(request: web.Request) -> web.Response:
    return web.json_response(_service(request).vm_status())


async def delete_vm(request: web.Request) -> web.Response:
    await _service(request).delete_vm()
    return web.Response(status=204)


async def pause_vm(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).pause())


async def resume_vm(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).resume())


async def sweep_vm(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).sweep())


async def put_outgoing(request: web.Request) -> web.Response:
    spec = OutgoingSpec.parse(await _body(request))
    return web.json_response(await _service(request).start_outgoing(spec), status=201)


async def put_incoming(request: web.Request) -> web.Response:
    spec = IncomingSpec.parse(await _body(request))
    return web.json_response(await _service(request).start_incoming(spec), status=202)


async def get_migration(request: web.Request) -> web.Response:
    return web.json_response(_service(request).migration_status())


async def delete_migration(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).cancel_migration())


async def shutdown(request: web.Request) -> web.Response:
    # Answer first; the serving loop sees the event and closes everything (service.close()).
    _service(request).stopping.set()
    return web.json_response({"stopping": True}, status=202)


# -- middlewares ----------------------------------------------------------------------------------

def _error(code: int, message: str) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=code)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ApiErrors, aiohttp's own refusals (404, 405, 413) and any bug become JSON errors."""
    try:
        return await handler(request)
    except ApiError as e:
        return _error(e.code, e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, f"{request.method} {request.path}: {e.reason}")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, f"internal error in {request.method} {request.path}")


@web.middleware
async def _bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    expected = request.app[_AUTH]
    if expected and request.path not in PUBLIC_PATHS:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            response = _error(401, "missing or wrong API bearer token")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
    return await handler(request)


def make_app(service: VmmService, token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[_errors_as_json, _bearer_auth], client_max_size=MAX_BODY_BYTES)
    app[_SERVICE] = service
    app[_AUTH] = f"Bearer {token}".encode() if token else b""
    app.add_routes([
        web.get("/v1/health", health),
        web.put("/v1/vm", put_vm),
        web.get("/v1/vm", get_vm),
        web.delete("/v1/vm", delete_vm),
        web.post("/v1/vm/pause", pause_vm),
        web.post("/v1/vm/resume", resume_vm),
        web.post("/v1/vm/sweep", sweep_vm),
        web.put("/v1/migration/outgoing", put_outgoing),
        web.put("/v1/migration/incoming", put_incoming),
        web.get("/v1/migration", get_migration),
        web.delete("/v1/migration", delete_migration),
        web.post("/v1/shutdown", shutdown),
        # Prometheus text exposition of the latest migration, behind the API token like the rest.
        web.get("/metrics", metrics_handler(service.registry)),
    ])
    return app


# -- binding it: the whole setup and teardown -----------------------------------------------------

def _claim_socket_path(path: Path) -> None:
    """Make the socket's folder (0700 when we make it); refuse a path a live server answers on,
    and remove a stale socket file left by a process that died."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ApiStartError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: stale
        return
    finally:
        probe.close()
    raise ApiStartError(f"{path}: another VMM serves its API there")


class ApiServer:
    """Serves a VmmService's API on one address. ``async with ApiServer(...) as s: s.address``."""

    def __init__(self, service: VmmService, address: ApiAddress, token: str | None = None) -> None:
        self.service = service
        self.bind = address
        self.token = token
        self.address = ""  # for clients: unix:/path or http://host:port
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        runner = web.AppRunner(make_app(self.service, self.token), handle_signals=False, access_log=None)
        await runner.setup()
        try:
            if self.bind.path is not None:
                _claim_socket_path(self.bind.path)
                await web.UnixSite(runner, str(self.bind.path)).start()
                os.chmod(self.bind.path, 0o600)  # the API drives VMs: its owner only
                self.address = f"unix:{self.bind.path}"
            else:
                await web.TCPSite(runner, self.bind.host, self.bind.port).start()
                host, port = runner.addresses[0][:2]
                self.address = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        except OSError as e:
            await runner.cleanup()
            raise ApiStartError(f"cannot serve the API on {self.bind}: {e}") from None
        self._runner = runner
        return self.address

    async def close(self) -> None:
        """Stop the VMM's work first (migration, VM), then stop answering and remove the socket."""
        await self.service.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            if self.bind.path is not None:
                self.bind.path.unlink(missing_ok=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def serve(address: ApiAddress, token: str | None, on_ready: Callable[[str], None] | None = None,
                console: Callable[[str], None] | None = None) -> None:
    """`vmm serve`: serve until POST /v1/shutdown, SIGTERM or SIGINT, then stop cleanly."""
    service = VmmService(console=console)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.stopping.set)
    async with ApiServer(service, address, token) as server:
        log.info("VMM API at %s", server.address)
        if on_ready is not None:
            on_ready(server.address)
        await service.stopping.wait()
    log.info("VMM API at %s: stopped", server.address)


@contextlib.asynccontextmanager
async def local_vmm(console: Callable[[str], None] | None = None) -> AsyncIterator[ApiClient]:
    """A VMM in this process, its API on a private unix socket, and a client for it: what
    `postcopy source` and `postcopy dest` drive (the same API a `vmm serve` answers)."""
    with tempfile.TemporaryDirectory(prefix="postcopy-vmm-") as tmp:
        async with ApiServer(VmmService(console=console), ApiAddress(path=Path(tmp) / "api.sock")) as server, \
                ApiClient(server.address) as client:
            yield client
