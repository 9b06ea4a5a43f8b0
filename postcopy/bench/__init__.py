"""`postcopy bench`: measurements that say exactly what they time, side by side in one run.

Each section is a module with ``run(opts: BenchOptions) -> dict`` (its part of the JSON) and
``table(result: dict) -> list[str]`` (its human lines); runner.py registers them by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class BenchError(Exception):
    """A benchmark run went wrong (the guest's check failed, a vCPU stopped); says which run."""


@dataclass(slots=True)
class BenchOptions:
    sections: tuple[str, ...]
    quick: bool = False
    vcpus: tuple[int, ...] = (1, 2)
    mem: int | None = None  # guest bytes; None: each section's own default (smaller with quick)
    repeat: int = 3  # runs of each configuration; the median is reported
    # Measurements shared between sections that must run interleaved (pagein and limit).
    shared: dict[str, Any] = field(default_factory=dict)


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
