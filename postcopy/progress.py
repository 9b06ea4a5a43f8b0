"""One updating terminal line while a migration runs: pages present / total, demand vs
background, rate, time left. It draws only on a terminal: off when the stream is not a tty."""
from __future__ import annotations

import sys
import time
from typing import Any, Final, TextIO

MIN_INTERVAL_S: Final = 0.1  # redraw at most this often


def render_line(status: dict[str, Any]) -> str:
    """The line for one GET /v1/migration answer of the destination."""
    state = status.get("state", "?")
    total = status.get("pages_total")
    if not total:
        return f"migration {state}"
    present = status.get("pages_present", 0)
    pages = status.get("pages") or {}
    rate = status.get("rate") or 0.0
    eta = status.get("eta_s")
    left = f"{eta:.1f} s" if eta is not None else "?"
    if present == total and state == "running":
        left = "0 s, the guest checks itself"  # the after-sweep runs before the report
    return (f"migration {state}: {present}/{total} pages ({100 * present / total:5.1f}%)  "
            f"demand {pages.get('demand', 0)} + readahead {pages.get('readahead', 0)}  "
            f"background {pages.get('background', 0)}  zero {pages.get('zero', 0)}  "
            f"{rate / 1000:.1f} k pages/s  left {left}")


class ProgressLine:
    """``update(status)`` redraws the line in place; ``close()`` ends it. Does nothing unless
    ``enabled`` (default: the stream is a terminal)."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._width = 0
        self._last = 0.0

    def update(self, status: dict[str, Any], force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < MIN_INTERVAL_S:
            return
        self._last = now
        line = render_line(status)
        # Pad over the previous line's tail: a shorter line must not leave stale characters.
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
