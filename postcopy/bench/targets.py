"""Issue 10's targets, checked against one bench result: every figure they name comes from
the same run, and each line says the figure, the bound and whether it holds. The targets were
set for the development host (2 cores, nested KVM: docs/performance.md); on another machine
they read as a reference, not a verdict. A target whose section (or vCPU count) did not run is
left out of the checks and named as not run.

In the JSON as ``targets``: a list of {"target", "value", "bound", "met"}, where bound is a
string such as ">= 0.8".
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
WRITTEN_FRACTION_ABOVE = 0.5  # a migrate row is a "mostly written" guest above this


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    op: str
    bound: float
    value: Callable[[dict[str, Any]], float | None]  # the figure from a result; None: not run

    def check(self, result: dict[str, Any]) -> dict[str, Any] | None:
        value = self.value(result)
        if value is None:
            return None
        return {"target": self.name, "value": round(value, 3), "bound": f"{self.op} {self.bound:g}",
                "met": _OPS[self.op](value, self.bound)}


def _at(*path: str) -> Callable[[dict[str, Any]], float | None]:
    def read(result: dict[str, Any]) -> float | None:
        node: Any = result
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return float(node) if isinstance(node, (int, float)) else None
    return read


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = result.get("migrate")
    return rows if isinstance(rows, list) else []


def _written(row: dict[str, Any]) -> bool:
    return row["written_mib"] > row["guest_mib"] * WRITTEN_FRACTION_ABOVE


def _worst(figure: Callable[[dict[str, Any]], float | None],
           pick: Callable[[dict[str, Any]], bool] = lambda r: True) -> Callable[[dict[str, Any]], float | None]:
    """The largest (every migrate bound is an upper one) of ``figure`` over the rows ``pick`` takes."""
    def read(result: dict[str, Any]) -> float | None:
        values = [v for r in _rows(result) if pick(r) and (v := figure(r)) is not None]
        return max(values) if values else None
    return read


TARGETS: tuple[Target, ...] = (
    Target("pagein exit / best classic, 1 vCPU", ">=", 1.25, _at("pagein", "ratio_exit_classic", "1")),
    Target("pagein exit / best classic, 2 vCPUs", ">=", 2.0, _at("pagein", "ratio_exit_classic", "2")),
    Target("pagein exit, Python / C, 1 vCPU", ">=", 0.8, _at("pagein", "ratio_to_limit", "exit", "1")),
    Target("pagein exit, Python / C, 2 vCPUs", ">=", 0.8, _at("pagein", "ratio_to_limit", "exit", "2")),
    Target("pagein classic, Python / C", ">=", 0.8, _at("pagein", "ratio_to_limit", "classic", "1")),
    Target("fetch p50 / raw-socket p50", "<=", 1.5, _at("fetch", "ratio_p50_to_socket")),
    Target("fetch p99 (us), 1 and 2 vCPUs", "<=", 150, _at("fetch", "p99_us")),
    Target("readahead scan / stream", ">=", 0.5, _at("fetch", "readahead_ratio_to_stream")),
    Target("stream / raw socket", ">=", 0.5, _at("stream", "ratio_to_socket")),
    Target("migrate downtime (ms), every row", "<=", 5.0, _worst(lambda r: r["downtime_ms"])),
    Target("migrate 1 GiB, mostly written (s)", "<=", 2.0,
           _worst(lambda r: r["total_ms"] / 1000, lambda r: r["guest_mib"] == 1024 and _written(r))),
    Target("migrate 4 GiB, mostly zero (s)", "<", 2.0,
           _worst(lambda r: r["total_ms"] / 1000, lambda r: r["guest_mib"] == 4096 and not _written(r))),
    Target("migrate written guests, total / (size / stream)", "<=", 1.3,
           _worst(lambda r: r.get("ratio_to_stream"), _written)),
    Target("migrate destination RSS over guest RAM (MiB)", "<=", 64,
           _worst(lambda r: r["rss_mib"] - r["guest_mib"])),
)


def check(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target the result has the figures for, in the issue's order."""
    return [c for t in TARGETS if (c := t.check(result)) is not None]


def not_run(result: dict[str, Any]) -> list[str]:
    """The targets the result has no figure for (a section, a vCPU count or the C limit left out)."""
    return [t.name for t in TARGETS if t.value(result) is None]


def unlike_development_host(host: dict[str, Any] | None) -> str | None:
    """How ``host`` (the JSON's ``host``) differs from the host the targets were set for (2
    CPUs, in a VM, KVM with shadow paging); None where it does not, or is not known."""
    if not host:
        return None
    differs = [f"{host['cpus']} CPUs" if host.get("cpus") != 2 else "",
               "not in a VM" if host.get("virtualized") is False else "",
               f"{host['paging']} paging" if host.get("paging") not in ("shadow", None) else ""]
    return ", ".join(d for d in differs if d) or None


def table(checks: list[dict[str, Any]], missing: list[str] | None = None, host: dict[str, Any] | None = None) -> list[str]:
    if not checks and not missing:
        return []
    met = sum(c["met"] for c in checks)
    lines = [f"targets (issue 10, set for the 2-core nested-KVM development host): {met} of {len(checks)} met"]
    differs = unlike_development_host(host)
    if differs:
        lines.append(f"  this host differs ({differs}): read them as a reference, not a verdict")
    for c in checks:
        lines.append(f"  {'ok  ' if c['met'] else 'MISS'}  {c['target']:<50} {c['value']:>9g}  {c['bound']}")
    lines += [f"  -     {name:<50} not run" for name in missing or []]
    return lines
