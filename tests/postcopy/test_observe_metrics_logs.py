"""The Prometheus exposition (checked with prometheus_client's own parser, over real HTTP) and
the JSON log lines."""
from __future__ import annotations

import asyncio
import io
import json
import logging

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from postcopy.logs import JsonFormatter, setup_logging
from postcopy.observe.prometheus import CONTENT_TYPE, Registry, metrics_handler


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by name and labels (prometheus_client's parser)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _registry() -> Registry:
    reg = Registry()
    faults = reg.counter("t_faults_total", "faults by kind", ("kind",))
    faults.set(3, kind="mmio")
    faults.inc(kind="fetch")
    faults.inc(2, kind="fetch")
    reg.gauge("t_state", 'odd "help" with \\ and\nnewline', ("state",)).set(1, state='we"ird\\')
    lat = reg.histogram("t_latency_seconds", "latency", buckets=(0.001, 0.01))
    for v in (0.0005, 0.001, 0.005, 0.5):
        lat.observe(v)
    return reg


def test_exposition_parses_with_the_reference_parser() -> None:
    samples = parse(_registry().render_prometheus())
    assert samples[("t_faults_total", frozenset({("kind", "mmio")}))] == 3
    assert samples[("t_faults_total", frozenset({("kind", "fetch")}))] == 3
    assert samples[("t_state", frozenset({("state", 'we"ird\\')}))] == 1
    # Buckets are cumulative and le is inclusive: 0.0005 and 0.001 fall in le=0.001.
    bucket = lambda le: samples[("t_latency_seconds_bucket", frozenset({("le", le)}))]  # noqa: E731
    assert (bucket("0.001"), bucket("0.01"), bucket("+Inf")) == (2, 3, 4)
    assert samples[("t_latency_seconds_count", frozenset())] == 4
    assert samples[("t_latency_seconds_sum", frozenset())] == pytest.approx(0.5065)


def test_registry_refuses_wrong_labels_and_conflicting_families() -> None:
    reg = Registry()
    fam = reg.counter("x_total", "x", ("a",))
    with pytest.raises(ValueError, match="labels"):
        fam.set(1, b="no")
    with pytest.raises(ValueError, match="already a counter"):
        reg.gauge("x_total", "x", ("a",))
    assert reg.counter("x_total", "x", ("a",)) is fam
    with pytest.raises(ValueError, match="increasing"):
        reg.histogram("h", "h", buckets=(2.0, 1.0))


def test_collectors_run_at_each_scrape_and_a_later_one_replaces_the_first() -> None:
    reg = Registry()
    gauge = reg.gauge("g", "g")
    reg.set_collector("side", lambda: gauge.set(1))
    reg.set_collector("side", lambda: gauge.set(2))
    assert parse(reg.render_prometheus())[("g", frozenset())] == 2


def test_metrics_handler_serves_the_exposition_over_http() -> None:
    async def main() -> str:
        app = web.Application()
        app.router.add_get("/metrics", metrics_handler(_registry()))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == CONTENT_TYPE
                return await resp.text()
        finally:
            await runner.cleanup()
    assert ("t_faults_total", frozenset({("kind", "mmio")})) in parse(asyncio.run(main()))


def test_json_log_lines_parse_with_event_and_fields() -> None:
    out = io.StringIO()
    setup_logging(True, "json", out)
    try:
        log = logging.getLogger("postcopy.test")
        log.info("destination: %s -> %s", "listen", "running",
                 extra={"event": "state", "migration_id": "mig-1", "from": "listen", "to": "running"})
        log.debug("not at INFO")
        try:
            raise OSError("no route")
        except OSError:
            log.exception("fetch failed", extra={"page": 7})
    finally:
        setup_logging(False, "text")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2
    state, error = lines
    assert state["event"] == "state" and state["level"] == "info" and state["logger"] == "postcopy.test"
    assert (state["migration_id"], state["from"], state["to"]) == ("mig-1", "listen", "running")
    assert state["msg"] == "destination: listen -> running" and state["ts"].endswith("+00:00")
    assert error["event"] == "fetch failed" and error["page"] == 7 and "OSError: no route" in error["error"]
    assert JsonFormatter().format(logging.makeLogRecord({"msg": "x", "obj": object()}))  # odd field: text


def test_log_format_must_be_known() -> None:
    with pytest.raises(ValueError, match="log format"):
        setup_logging(False, "xml")  # type: ignore[arg-type]
