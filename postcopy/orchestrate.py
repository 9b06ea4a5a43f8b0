"""One migration between two VMMs, driven through their control APIs alone: what `postcopy
migrate` and `postcopy demo` run. The migration itself happens inside the VMMs (api/service.py);
this only asks them, in order, and follows the destination until it is done."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from postcopy.api.client import ApiClient, ApiClientError
from postcopy.progress import ProgressLine

__all__ = ["MigrateOptions", "OrchestrationError", "run_migration"]

log = logging.getLogger("postcopy.orchestrate")
POLL_S: Final = 0.1
FINAL_STATES: Final = frozenset({"completed", "failed"})


class OrchestrationError(Exception):
    """The migration could not be run or did not complete; the message says at which step."""


@dataclass(slots=True)
class MigrateOptions:
    """Everything `postcopy migrate` can be told (extend here: one place for new flags)."""

    token: str  # the migration token the page server wants
    page_listen: str = "127.0.0.1:0"  # HOST:PORT of the source's page server
    page_url: str | None = None  # the URL the destination uses, if not the one it binds
    fault_mode: str = "exit"  # exit | classic | auto (auto: the destination's host decides)
    create: bool = False  # boot the guest on the source first
    mem: str | int = "256M"
    vcpus: int = 2
    seed: int = 7
    workload: str = "memtouch"
    warmup_s: float = 1.0  # how long a created guest runs on the source before the migration
    after_s: float = 1.0  # how long it runs on the destination before the guest check
    readahead: int = 4
    readahead_max: int | None = None  # the destination's largest readahead window (None: its default)
    timeout_s: float = 600.0  # from incoming started to completed
    timeline: bool = False  # the report carries the migration's timeline (for --report)
    state_dir: str | None = None  # a created guest's RAM in DIR/ram, restartable page server
    prefill: float | None = None  # fraction of a created memtouch guest's RAM written before it starts
    tls_cert: str | None = None  # the page server speaks TLS with this certificate and key
    tls_key: str | None = None
    tls_ca: str | None = None  # the destination trusts only this CA for the page server
    retry_deadline_s: float | None = None  # how long one outage of the page server may last
    vcpu_nice: int | None = None  # the destination's vCPU threads while memory is missing (None: its default)


async def run_migration(source: ApiClient, dest: ApiClient, opts: MigrateOptions,
                        progress: ProgressLine | None = None,
                        route: Callable[[str], Awaitable[str]] | None = None) -> dict[str, Any]:
    """Create (optionally) and check the guest on the source, start outgoing there and incoming
    on the destination, follow the destination; return its report (`postcopy demo --json`).
    ``route`` maps the page server's URL to the one the destination is given (the demo's
    fault-injection proxy sits there)."""
    try:
        if opts.create:
            await source.create_vm(opts.mem, opts.vcpus, opts.workload, opts.seed, state_dir=opts.state_dir,
                                   prefill=opts.prefill)
            await asyncio.sleep(opts.warmup_s)
        before = await source.sweep()  # the guest's own check, on the source
        outgoing = await source.outgoing(opts.page_listen, opts.token, opts.page_url,
                                         tls_cert=opts.tls_cert, tls_key=opts.tls_key)
    except ApiClientError as e:
        raise OrchestrationError(f"source: {e}") from None
    page_url = outgoing["url"] if route is None else await route(outgoing["url"])
    log.info("source page server at %s", page_url)
    try:
        await dest.incoming(page_url, opts.token, fault_mode=opts.fault_mode, after_s=opts.after_s,
                            readahead=opts.readahead, source_check=before, timeline=opts.timeline,
                            tls_ca=opts.tls_ca, retry_deadline_s=opts.retry_deadline_s, vcpu_nice=opts.vcpu_nice,
                            readahead_max=opts.readahead_max)
    except ApiClientError as e:
        await _cancel_quietly(source)  # the guest keeps running on the source
        raise OrchestrationError(f"destination: {e}") from None
    try:
        status = await follow(dest, opts.timeout_s, progress)
    except BaseException:
        await _cancel_quietly(dest)  # Ctrl-C or a timeout: stop the destination
        raise
    if status["state"] != "completed" or status.get("report") is None:
        raise OrchestrationError(f"the migration failed: {'; '.join(status.get('errors') or ['no reason given'])}")
    return status["report"]


async def follow(dest: ApiClient, timeout_s: float, progress: ProgressLine | None = None) -> dict[str, Any]:
    """Poll GET /v1/migration until completed or failed; returns the last answer."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                status = await dest.migration()
            except ApiClientError as e:
                raise OrchestrationError(f"destination: {e}") from None
            if progress is not None:
                progress.update(status, force=status["state"] in FINAL_STATES)
            if status["state"] in FINAL_STATES:
                return status
            if time.monotonic() > deadline:
                raise OrchestrationError(f"the migration did not complete within {timeout_s:.0f} s "
                                         f"(state {status['state']})")
            await asyncio.sleep(POLL_S)
    finally:
        if progress is not None:
            progress.close()


async def _cancel_quietly(api: ApiClient) -> None:
    try:
        await api.cancel_migration()
    except ApiClientError as e:
        log.info("cancel at %s: %s", api.address, e)
