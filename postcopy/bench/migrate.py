"""Bench section `migrate`: whole post-copy migrations over loopback, by guest size.

Each row is one migration on the real path (a source VMM, `vmm serve`, running memtouch ->
Destination: prepare, switchover, exit-mode faults plus the background transfer, complete),
run in a child process of its own so that its peak RSS (VmHWM) is the destination's
alone (not ru_maxrss: Linux carries that high-water mark across fork and exec, so a child
started by a bench that had paged in 256 MiB reported the parent's 620 MiB). A "written" guest has 75% of its RAM written before its guest starts (PUT /v1/vm's
``prefill``), a "zero" one only what memtouch's fill reaches before the switchover;
`written_mib` is measured, from the source's zero map.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import uvloop

from postcopy.bench import BenchError
from postcopy.bench.common import BenchOptions, section_main, source_process
from postcopy.destination.migration import Destination
from proto.version import PAGE_SIZE
from vmm.libc import ends_with_parent

MiB = 1 << 20
VCPUS = 2
WRITTEN_FRACTION = 0.75
QUICK_ROWS = [(256, True)]  # the whole `postcopy bench --quick` has a minute
FULL_ROWS = [(256, False), (256, True), (1024, False), (1024, True), (4096, False), (4096, True)]
CHILD_TIMEOUT_S = 300


def migrate_once(guest_mib: int, prefill: float) -> dict[str, Any]:
    """One migration, in this process; returns its row."""
    with source_process(guest_mib * MiB, VCPUS, prefill=prefill) as source:

        async def migrate() -> dict[str, Any]:
            dest = Destination(source.url, source.token, fault_mode="exit")
            try:
                await dest.prepare(guest_mib * MiB, VCPUS)
                await dest.switchover()
                result = await dest.wait_complete(timeout=CHILD_TIMEOUT_S)
                assert dest.tracker is not None
                zero_pages = int.from_bytes(dest.tracker.zero_bitmap, "little").bit_count()
                dest.machine.check()  # type: ignore[union-attr]
            finally:
                await dest.close()
            # switchover_ms: header request sent -> vCPUs started, measured here (the downtime
            # less the source's pause before it, plus the request's flight).
            return {"downtime_ms": result.downtime_ms, "switchover_ms": result.switchover_ms,
                    "header_bytes": result.header_bytes, "total_ms": result.total_ms,
                    "written_mib": round((guest_mib * MiB // PAGE_SIZE - zero_pages) * PAGE_SIZE / MiB),
                    "pages": result.pages}

        row = uvloop.run(migrate())
    return {"guest_mib": guest_mib, **row, "rss_mib": round(peak_rss_kib() / 1024)}


def peak_rss_kib() -> int:
    """This process's own peak resident set (VmHWM of /proc/self/status), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise BenchError("no VmHWM in /proc/self/status")


def run(opts: BenchOptions) -> list[dict[str, Any]]:
    """The rows (this section's JSON is a list: `migrate: [rows]`, as issue 10 names it)."""
    rows = []
    for guest_mib, written in QUICK_ROWS if opts.quick else FULL_ROWS:
        child = subprocess.run([sys.executable, "-m", "postcopy.bench.migrate", "--one", str(guest_mib),
                                str(WRITTEN_FRACTION if written else 0.0)],
                               capture_output=True, timeout=CHILD_TIMEOUT_S, check=False,
                               preexec_fn=ends_with_parent())
        if child.returncode:
            raise BenchError(f"migration of {guest_mib} MiB failed: {child.stderr.decode()[-2000:]}")
        rows.append(json.loads(child.stdout))
    return rows


def add_stream_bound(rows: list[dict[str, Any]], stream_mib_s: float) -> None:
    """Each row's time against the `stream` section's rate from the same run: issue 10's bound
    for a mostly written guest is 1.3 x guest size / stream rate (``ratio_to_stream``)."""
    for r in rows:
        r["stream_bound_ms"] = round(r["guest_mib"] / stream_mib_s * 1000, 1)
        r["ratio_to_stream"] = r["total_ms"] / r["stream_bound_ms"]


def table(result: list[dict[str, Any]]) -> list[str]:
    lines = ["migrate: post-copy over loopback, 2 vCPUs, exit mode",
             f"  {'guest MiB':>9} {'written':>8} {'downtime ms':>12} {'total ms':>9} {'/ stream':>9} "
             f"{'dest RSS MiB':>13}"]
    for r in result:
        bound = f"{r['ratio_to_stream']:>9.2f}" if "ratio_to_stream" in r else f"{'-':>9}"
        lines.append(f"  {r['guest_mib']:>9} {r['written_mib']:>8} {r['downtime_ms']:>12} {r['total_ms']:>9.0f} "
                     f"{bound} {r['rss_mib']:>13}")
    return lines


def plot(result: list[dict[str, Any]], path: str) -> None:
    """Migration time and downtime by guest size, one line per kind of guest."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (total, down) = plt.subplots(1, 2, figsize=(10, 4))
    for written, label in ((False, "mostly zero"), (True, f"{WRITTEN_FRACTION:.0%} written")):
        rows = sorted((r for r in result if (r["written_mib"] > r["guest_mib"] / 2) == written),
                      key=lambda r: r["guest_mib"])
        sizes = [r["guest_mib"] for r in rows]
        total.plot(sizes, [r["total_ms"] / 1000 for r in rows], marker="o", label=label)
        down.plot(sizes, [r["downtime_ms"] for r in rows], marker="o", label=label)
    for ax, title, unit in ((total, "total migration time", "s"), (down, "downtime", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("guest RAM (MiB)")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)  # a zoomed axis would make a flat line look steep
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("post-copy over loopback, 2 vCPUs, exit mode")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(migrate_once(int(sys.argv[2]), float(sys.argv[3]))))
        return 0
    if sys.argv[1:2] == ["--plot"]:  # --plot RESULT.json OUT.png (RESULT: this section's --json)
        with open(sys.argv[2]) as f:
            plot(json.load(f)["migrate"], sys.argv[3])
        return 0
    return section_main("migrate", run, table)


if __name__ == "__main__":
    raise SystemExit(main())
