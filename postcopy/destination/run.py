"""Pull a running guest from a source, keep it running, and have it verify itself: the
destination's whole job, used by `postcopy dest` and the demo alike."""
from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any, Callable

import aiohttp

from postcopy.destination.background import DEFAULT_BATCH_PAGES, DEFAULT_DEPTH
from postcopy.destination.client import FetchError, auth_headers, tls_option
from postcopy.destination.retry import FatalFetchError, RetryContext, RetryPolicy, retry_async
from proto import ErrorReply, ProtoError, decode_any
from postcopy.destination.migration import Destination, FaultMode, MigrationError, result_dict

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


async def migrate(source_url: str, token: str, fault_mode: FaultMode, *, after_s: float = 1.0,
                  before: dict[str, Any] | None = None, readahead_base: int = 4,
                  console: Callable[[str], None] | None = None, retry: RetryPolicy | None = None,
                  ssl_context: ssl.SSLContext | None = None, background_batch_pages: int = DEFAULT_BATCH_PAGES,
                  background_depth: int = DEFAULT_DEPTH) -> dict[str, Any]:
    """Migrate, let the guest run ``after_s`` here, order a full sweep; return the report.
    ``before`` is the source-side sweep result, if one was made."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls_option(ssl_context))) as session:
        status = await retry_async(RetryContext(retry), "source status",
                                   lambda: source_json(session, "GET", f"{source_url}/v1/vm/status", token))
    dest = Destination(source_url, token, fault_mode=fault_mode, readahead_base=readahead_base, console=console,
                       retry=retry, ssl_context=ssl_context, background_batch_pages=background_batch_pages,
                       background_depth=background_depth)
    try:
        await dest.prepare(int(status["guest_bytes"]), int(status["vcpu_count"]))
        await dest.switchover()
        result = await dest.wait_complete(timeout=MIGRATION_TIMEOUT_S)
        assert dest.machine is not None and dest.tracker is not None
        services = dest.machine.services
        verified_at_complete = services.verified
        t_end = time.monotonic() + after_s
        while time.monotonic() < t_end and not dest.machine.failures():
            await asyncio.sleep(0.05)
        after_ok = await asyncio.to_thread(services.sweep, SWEEP_TIMEOUT_S)
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
        return report
    finally:
        await dest.close()


__all__ = ["migrate", "source_json", "MigrationError", "FetchError"]
