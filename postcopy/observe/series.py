"""Sampled time series: integer columns against CLOCK_MONOTONIC, kept in typed arrays, sampled
by a task on the event loop (never on a vCPU or fault path)."""
from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("postcopy.observe")
MAX_SAMPLES = 1 << 16  # past this the oldest half goes: a bounded history, whatever the uptime


class Series:
    """Columns of integers sampled at the same instants."""

    __slots__ = ("names", "t_ns", "columns", "limit")

    def __init__(self, names: Sequence[str], limit: int = MAX_SAMPLES) -> None:
        self.names = tuple(names)
        self.t_ns = array("q")
        self.columns = tuple(array("q") for _ in self.names)
        self.limit = limit

    def add(self, t_ns: int, values: Sequence[int]) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"series {self.names} takes {len(self.columns)} values, got {len(values)}")
        if len(self.t_ns) >= self.limit:
            drop = self.limit // 2
            del self.t_ns[:drop]
            for column in self.columns:
                del column[:drop]
        for column, value in zip(self.columns, values):
            column.append(value)
        self.t_ns.append(t_ns)

    def cut_after(self, t_ns: int) -> None:
        """Drop the samples taken after ``t_ns`` (the last ones: samples come in time order)."""
        keep = len(self.t_ns)
        while keep and self.t_ns[keep - 1] > t_ns:
            keep -= 1
        del self.t_ns[keep:]
        for column in self.columns:
            del column[keep:]

    def __len__(self) -> int:
        return len(self.t_ns)

    def as_dict(self, origin_ns: int) -> dict[str, Any]:
        """``{"t_ms": [...], name: [...], ...}``, times in ms relative to ``origin_ns``."""
        n = len(self.t_ns)
        out: dict[str, Any] = {"t_ms": [round((t - origin_ns) / 1e6, 3) for t in self.t_ns[:n]]}
        for name, column in zip(self.names, self.columns):
            out[name] = column[:n].tolist()
        return out


class Sampler:
    """Calls ``sample(now_ns)`` every ``interval_s`` on the running loop until stopped."""

    def __init__(self, interval_s: float, sample: Callable[[int], None]) -> None:
        self.interval_s = interval_s
        self.sample = sample
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def cancel(self) -> None:
        """Stop at once, with no last sample (the caller took its own), and without waiting for
        the loop to run the cancellation: a caller in a hurry (the source's switchover)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        """Stop, with one last sample so every series ends at the moment it was stopped."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        self.sample(time.monotonic_ns())

    async def _run(self) -> None:
        while True:
            try:
                self.sample(time.monotonic_ns())
            except Exception:  # noqa: BLE001 - observing must never break what it observes
                log.exception("sampler %s failed; sampling stops", self.sample)
                return
            await asyncio.sleep(self.interval_s)
