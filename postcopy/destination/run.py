"""Pull a running guest from a source, keep it running, and have it verify itself: the
destination's whole job, used by `postcopy dest` and the demo alike."""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any, Callable

import aiohttp

from postcopy.destination.background import DEFAULT_BATCH_PAGES, DEFAULT_DEPTH
from postcopy.destination.client import FetchError, auth_headers, tls_option
from postcopy.destination.readahead import DEFAULT_BASE, DEFAULT_MAX
from postcopy.destination.retry import FatalFetchError, RetryContext, RetryPolicy, retry_async
from postcopy.destination.vcpu_priority import POSTCOPY_VCPU_NICE
from proto import ErrorReply, ProtoError, decode_any
from postcopy.destination.migration import Destination, FaultMode, MigrationError, result_dict
from postcopy.observe.prometheus import Registry
from vmm.machine import Machine

log = logging.getLogger("postcopy.destination.run")

SWEEP_TIMEOUT_S = 60.0
MIGRATION_TIMEOUT_S = 300.0


async def source_json(session: aiohttp.ClientSession, method: str, url: str, token: str) -> dict[str, Any]:
    """A JSON control request. A 4xx answer (a wrong token above all) and a certificate the
    given CA does not trust are FatalFetchErrors: retrying cannot change them."""
    try:
        async with session.request(method, url, headers=auth_headers(token)) as resp:
            if resp.status != 200:
                error = FatalFetchError if 400 <= resp.status < 500 else FetchError
                raise error(f"{method} {url}: HTTP {resp.status}: {_reason(await resp.read())}")
            return await resp.json(content_type=None)
    except aiohttp.ClientConnectorCertificateError as e:
        raise FatalFetchError(f"{method} {url}: TLS: the source's certificate is not trusted by the given CA "
                              f"({e.certificate_error})") from None
    except aiohttp.ClientSSLError as e:
        raise FatalFetchError(f"{method} {url}: TLS handshake failed: {e}") from None
    except (aiohttp.ClientError, OSError) as e:
        raise FetchError(f"{method} {url}: {e}") from None


def _reason(body: bytes) -> str:
    try:
        msg = decode_any(body)
    except ProtoError:
        return repr(body[:200])
    return msg.message if isinstance(msg, ErrorReply) else type(msg).__name__


async def source_progress(session: aiohttp.ClientSession, source_url: str, token: str) -> dict[str, Any] | None:
    """The guest's progress series from the source (ms from its pause), or None if it has none."""
    try:
        return await source_json(session, "GET", f"{source_url}/v1/vm/progress", token)
    except FetchError as e:
        log.warning("no guest progress from the source: %s", e, extra={"event": "source_progress_missing"})
        return None


async def migrate(source_url: str, token: str, fault_mode: FaultMode, *, after_s: float = 1.0,
                  before: dict[str, Any] | None = None, readahead_base: int = DEFAULT_BASE, readahead_max: int = DEFAULT_MAX,
                  console: Callable[[str], None] | None = None, timeline: bool = False,
                  registry: Registry | None = None,
                  on_destination: Callable[[Destination], None] | None = None,
                  adopt: Callable[[Machine], None] | None = None, retry: RetryPolicy | None = None,
                  ssl_context: ssl.SSLContext | None = None, background_batch_pages: int = DEFAULT_BATCH_PAGES,
                  background_depth: int = DEFAULT_DEPTH, vcpu_nice: int = POSTCOPY_VCPU_NICE) -> dict[str, Any]:
    """Migrate, let the guest run ``after_s`` here, order a full sweep; return the report.
    ``before`` is the source-side sweep result, if one was made. ``timeline`` adds
    report["timeline"] (Destination.metrics(), with the source's progress series);
    ``registry`` is where the destination's Prometheus metrics go. ``on_destination`` sees the
    Destination before it prepares (to follow its progress); ``adopt``, if given, receives the
    running guest (every page present) instead of it being paused and closed. ``retry`` says
    how long a lost source is waited for; ``ssl_context`` is the TLS the source must speak;
    ``vcpu_nice`` the vCPU threads' nice value while memory is missing (vcpu_priority.py)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls_option(ssl_context))) as session:
        status = await retry_async(RetryContext(retry), "source status",
                                   lambda: source_json(session, "GET", f"{source_url}/v1/vm/status", token))
        dest = Destination(source_url, token, fault_mode=fault_mode, readahead_base=readahead_base,
                           readahead_max=readahead_max,
                           console=console, registry=registry, retry=retry, ssl_context=ssl_context,
                           background_batch_pages=background_batch_pages, background_depth=background_depth,
                           vcpu_nice=vcpu_nice)
        if on_destination is not None:
            on_destination(dest)
        try:
            return await _migrate(dest, session, status, after_s=after_s, before=before, timeline=timeline,
                                  adopt=adopt)
        finally:
            await dest.close()


async def _migrate(dest: Destination, session: aiohttp.ClientSession, status: dict[str, Any], *,
                   after_s: float, before: dict[str, Any] | None, timeline: bool,
                   adopt: Callable[[Machine], None] | None) -> dict[str, Any]:
    await dest.prepare(int(status["guest_bytes"]), int(status["vcpu_count"]))
    await dest.switchover()
    # The source's series ends at its pause: fetch it while the source still serves (it exits
    # once it hears Complete), off the vCPUs' path.
    progress = asyncio.ensure_future(source_progress(session, dest.source_url, dest.token)) if timeline else None
    try:
        result = await dest.wait_complete(timeout=MIGRATION_TIMEOUT_S)
        assert dest.machine is not None and dest.tracker is not None
        services = dest.machine.services
        verified_at_complete = services.verified
        t_end = time.monotonic() + after_s
        while time.monotonic() < t_end and not dest.machine.failures():
            await asyncio.sleep(0.05)
        await dest.stop_sampling()  # the timeline ends before the sweep, which is not the workload
        # A failed vCPU never answers a sweep: do not wait SWEEP_TIMEOUT_S to learn it.
        after_ok = not dest.machine.failures() and await asyncio.to_thread(services.sweep, SWEEP_TIMEOUT_S)
        if adopt is None:
            dest.machine.pause()
        failures = dest.machine.failures()
        after_pages = sum(p.sweep_pages for p in services.progress)
        after_errors = sum(p.sweep_errors for p in services.progress)
        # The guest's own error count travels with it: it includes what it found on the source.
        guest_errors = services.errors + after_errors
        before_ok = before is None or bool(before.get("ok"))
        report = result_dict(result)
        report.update({
            "verified": bool(before_ok and after_ok and not failures and guest_errors == 0
                             and dest.tracker.missing() == 0 and not services.exceptions
                             and services.verified > verified_at_complete),
            "guest_errors": guest_errors,
            "guest": {
                "before": {"swept_pages": (before or {}).get("pages"), "errors": (before or {}).get("errors")},
                "after": {"swept_pages": after_pages, "errors": after_errors, "finished": after_ok},
                "pages_verified_total": services.verified,
                "progress_after_complete": services.verified - verified_at_complete,
                "exceptions": len(services.exceptions),
            },
            "all_pages_present": dest.tracker.missing() == 0,
            "failures": failures,
        })
        if progress is not None:
            report["timeline"] = dest.metrics()
            report["timeline"]["progress"]["source"] = await progress
            progress = None
        if adopt is not None and report["all_pages_present"]:
            adopt(dest.detach_machine())
        return report
    finally:
        if progress is not None:
            progress.cancel()


__all__ = ["migrate", "source_json", "source_progress", "MigrationError", "FetchError"]
