"""The `postcopy bench` command's engine: the sections by name, their options, one JSON object
or a table.

Sections run in the order of SECTIONS; `pagein` and `limit` share one interleaved measurement
loop (pagein.measure), so asking for both costs one loop, and their ratios come from one run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import time
from dataclasses import asdict
from types import ModuleType
from typing import Any

from postcopy import hostinfo
from postcopy.bench import STREAM_MIN_ROUNDS, BenchError, BenchOptions, targets
from vmm.memory import parse_size

# Every section, in run order: name -> module (with run(opts) -> dict and table(result) -> list[str]).
SECTIONS: dict[str, str] = {
    "pagein": "postcopy.bench.pagein",
    "limit": "postcopy.bench.limit",
    # Over the page server on loopback, against a source VMM (bench/common.py).
    "fetch": "postcopy.bench.fetch",
    "stream": "postcopy.bench.stream",
    "migrate": "postcopy.bench.migrate",
}
FULL_REPEAT, QUICK_REPEAT = 3, 9


def available() -> dict[str, ModuleType]:
    """The registered sections whose module is installed."""
    found = {}
    for name, module in SECTIONS.items():
        try:
            found[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise  # the section exists but something it needs does not
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small version of every section (under a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, from {', '.join(SECTIONS)} (default: all present)")
    parser.add_argument("--vcpus", default="1,2", help="vCPU counts to run, comma-separated (default 1,2)")
    parser.add_argument("--mem", help="guest size for the page-in sections (default 256M, 32M with --quick)")
    parser.add_argument("--repeat", type=int, help=f"runs of each configuration; the median is reported (default "
                        f"{FULL_REPEAT}, {QUICK_REPEAT} with --quick: its runs are short, so one preemption weighs more; "
                        f"the stream section, whose rounds are short, runs {STREAM_MIN_ROUNDS} at least)")


def options(args: argparse.Namespace) -> BenchOptions:
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise BenchError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    try:
        vcpus = tuple(int(v) for v in args.vcpus.split(","))
    except ValueError:
        raise BenchError(f"--vcpus wants numbers separated by commas, got {args.vcpus!r}") from None
    if not vcpus or any(v < 1 for v in vcpus):
        raise BenchError(f"--vcpus wants counts of at least 1, got {args.vcpus!r}")
    repeat = args.repeat if args.repeat is not None else QUICK_REPEAT if args.quick else FULL_REPEAT
    if repeat < 1:
        raise BenchError(f"--repeat must be at least 1, got {repeat}")
    mem = parse_size(args.mem) if args.mem else None
    return BenchOptions(sections=sections, quick=args.quick, vcpus=vcpus, mem=mem, repeat=repeat)


def run(opts: BenchOptions, progress=None) -> dict[str, Any]:
    """Run the asked sections that are present; a section that is not installed is reported so."""
    present = available()
    # Which host the figures come from: its CPUs, KVM's paging and how its idle CPUs wait move them.
    out: dict[str, Any] = {"host": asdict(hostinfo.describe())}
    for name in SECTIONS:
        if name not in opts.sections:
            continue
        module = present.get(name)
        if module is None:
            out[name] = {"skipped": "not installed in this build"}
            continue
        t0 = time.monotonic()
        out[name] = module.run(opts)
        if progress is not None:
            progress(f"bench: {name} done in {time.monotonic() - t0:.1f} s")
    if isinstance(out.get("migrate"), list) and "mib_s" in out.get("stream", {}):  # both ran
        present["migrate"].add_stream_bound(out["migrate"], out["stream"]["mib_s"])
    out["targets"] = targets.check(out)
    out["targets_not_run"] = targets.not_run(out)
    return out


def table(result: dict[str, Any]) -> list[str]:
    present = available()
    lines: list[str] = []
    if "host" in result:
        lines += [f"host: {hostinfo.HostInfo(**result['host']).summary()}", ""]
    for name, part in result.items():
        if name not in SECTIONS:
            continue
        if "skipped" in part and name not in ("limit",):
            lines.append(f"{name}: skipped: {part['skipped']}")
        elif name in present:
            lines += present[name].table(part)
        lines.append("")
    return lines + targets.table(result.get("targets", []), result.get("targets_not_run"), result.get("host"))


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(args: argparse.Namespace) -> int:
    # SIGTERM (a timeout, a kill) unwinds like Ctrl-C: each section's source VMM is stopped and
    # its files removed (a SIGKILL leaves the files; the VMMs end with us: vmm.libc.ends_with_parent).
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        opts = options(args)
        result = run(opts, progress=None if args.json else lambda s: print(s, file=sys.stderr, flush=True))
    except BenchError as e:
        print(f"postcopy bench: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() called in a process that goes on (tests)
    # allow_nan=False: a figure that came out NaN (a zero divisor) is null, and the JSON valid
    print(json.dumps(_no_nan(result), allow_nan=False) if args.json else "\n".join(table(result)).rstrip())
    return 0
