"""`postcopy bench`: measurements that say exactly what they time, side by side in one run.

Each section is a module with ``run(opts: BenchOptions) -> dict`` (its part of the JSON) and
``table(result: dict) -> list[str]`` (its human lines); runner.py registers them by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# The stream section's rounds at least, whatever --repeat says: a round (a transfer and three
# socket runs) takes ~0.5 s at 512 MiB, and in a full run's three rounds two slow socket runs
# (2,100 against 4,300 MiB/s here, the host's spells) once decided the median ratio.
STREAM_MIN_ROUNDS = 9


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


def paired_ratio(a: list[float], b: list[float]) -> float:
    """How ``a`` compares with ``b``, measured in rounds (a[i] ran right beside b[i]): the median
    of the rounds' ratios. This host's speed drifts by a third over seconds (other work under
    this microVM); each ratio is taken at one speed, where a ratio of medians mixes speeds."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio needs rounds of both, got {len(a)} and {len(b)}")
    return median([x / y if y else float("nan") for x, y in zip(a, b)])
