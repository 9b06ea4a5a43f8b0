"""A small Prometheus registry and its text exposition format (version 0.0.4).

Written here rather than taken from prometheus_client: that library keeps a process-global
registry and wants its metrics updated where things happen; ours are read, at scrape time, from
the objects that already count them (page tracker, fault logs, page server stats), by
collectors a migration registers under a key (a new migration replaces the old one's), so the
hot paths stay as they are. The tests parse our output with prometheus_client's own parser.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MetricType = Literal["counter", "gauge", "histogram"]
Labels = tuple[str, ...]
# Fault latencies on this host run from ~10 us (exit, readahead hit) to tens of ms (classic).
LATENCY_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)


@dataclass(slots=True)
class HistogramValue:
    bounds: Sequence[float]
    counts: list[int]  # per bucket, not cumulative; the last is +Inf
    sum: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


@dataclass(slots=True)
class Family:
    name: str
    type: MetricType
    help: str
    labelnames: Labels
    buckets: Sequence[float] = ()
    samples: dict[Labels, float | HistogramValue] = field(default_factory=dict)

    def _key(self, labels: dict[str, object]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"metric {self.name} has labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def set(self, value: float, **labels: object) -> None:
        """Counters too: a collector copies a count that only grows from where it is kept."""
        self.samples[self._key(labels)] = value

    def inc(self, value: float = 1, **labels: object) -> None:
        key = self._key(labels)
        self.samples[key] = float(self.samples.get(key, 0)) + value  # type: ignore[arg-type]

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        hist = self.samples.get(key)
        if not isinstance(hist, HistogramValue):
            hist = self.samples[key] = HistogramValue(self.buckets, [0] * (len(self.buckets) + 1))
        hist.observe(value)

    def clear(self) -> None:
        self.samples.clear()


class Registry:
    def __init__(self) -> None:
        self._families: dict[str, Family] = {}
        self._collectors: dict[str, Callable[[], None]] = {}

    def _family(self, name: str, type_: MetricType, help_: str, labels: Iterable[str],
                buckets: Sequence[float] = ()) -> Family:
        labelnames = tuple(labels)
        old = self._families.get(name)
        if old is not None:
            if (old.type, old.labelnames) != (type_, labelnames):
                raise ValueError(f"metric {name} is already a {old.type} with labels {old.labelnames}")
            return old
        fam = self._families[name] = Family(name, type_, help_, labelnames, tuple(buckets))
        return fam

    def counter(self, name: str, help_: str, labels: Iterable[str] = ()) -> Family:
        return self._family(name, "counter", help_, labels)

    def gauge(self, name: str, help_: str, labels: Iterable[str] = ()) -> Family:
        return self._family(name, "gauge", help_, labels)

    def histogram(self, name: str, help_: str, labels: Iterable[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS_S) -> Family:
        if list(buckets) != sorted(buckets):
            raise ValueError(f"histogram {name}: buckets must be increasing, got {buckets}")
        return self._family(name, "histogram", help_, labels, buckets)

    def set_collector(self, key: str, collect: Callable[[], None]) -> None:
        """``collect`` runs before every render; a second one under the same key replaces it."""
        self._collectors[key] = collect

    def render_prometheus(self) -> str:
        for collect in list(self._collectors.values()):
            collect()
        lines: list[str] = []
        for fam in self._families.values():
            lines.append(f"# HELP {fam.name} {_escape(fam.help, quote=False)}")
            lines.append(f"# TYPE {fam.name} {fam.type}")
            for key, value in sorted(fam.samples.items()):
                labels = list(zip(fam.labelnames, key))
                if isinstance(value, HistogramValue):
                    running = 0
                    for bound, n in zip((*value.bounds, math.inf), value.counts):
                        running += n
                        lines.append(_sample(f"{fam.name}_bucket", [*labels, ("le", _number(bound))], running))
                    lines.append(_sample(f"{fam.name}_sum", labels, value.sum))
                    lines.append(_sample(f"{fam.name}_count", labels, running))
                else:
                    lines.append(_sample(fam.name, labels, value))
        return "\n".join(lines) + "\n"


def _escape(text: str, quote: bool = True) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _sample(name: str, labels: list[tuple[str, str]], value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{name}{{{inner}}} {_number(value)}"


def metrics_handler(registry: Registry) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler for GET /metrics serving ``registry`` (auth is the app's business)."""
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=registry.render_prometheus().encode(), headers={"Content-Type": CONTENT_TYPE})
    return handle
