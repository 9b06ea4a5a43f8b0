"""Section `limit`: the same page-in as section `pagein` (same guest code, modes, placement and
sizes) written in C, built here with the system compiler: the host's limit, against which the
Python modes are reported as fractions. No compiler: the section says so and has no figures.

The guest is booted by Python exactly as for `pagein` and dumped for the C program (limit.c):
the pages below DATA_GPA, each vCPU's kvm_regs and kvm_sregs, and the CPUID entries.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from postcopy.bench import BenchError, BenchOptions
from vmm.guest.layout import DATA_GPA
from vmm.guest.services import GS_DONE, GS_EXCEPTION, GS_PORT

SOURCE = "limit.c"
CFLAGS = ("-O2", "-pthread")
VERSION_TIMEOUT_S = 10.0
DUMP_MAGIC = b"PCLIMIT1"
DUMP_HEADER = struct.Struct("<8sIIQQIIIIII")  # limit.c struct dump_header
RUN_TIMEOUT_S = 120


class LimitUnavailable(Exception):
    """The C limit cannot be built here (no compiler, or it failed); the message says why."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "postcopy-vmm"


@dataclass(slots=True)
class Limit:
    binary: Path

    @classmethod
    def build(cls) -> Limit:
        """The compiled program, from the cache or built now."""
        source = resources.files("postcopy.bench").joinpath(SOURCE).read_bytes()
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None or shutil.which(cc) is None:
            raise LimitUnavailable("no C compiler (cc) on PATH: the C limit figures are left out")
        # Keyed by what makes the binary: the source, the flags and the compiler (its path and
        # version), so another compiler or an upgraded one builds afresh.
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT_S).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LimitUnavailable(f"{cc} --version failed ({e}): the C limit figures are left out") from None
        digest = hashlib.sha256(b"\0".join(
            [source, " ".join(CFLAGS).encode(), cc.encode(), version.encode()])).hexdigest()[:16]
        binary = cache_dir() / f"limit-{digest}"
        if binary.exists():
            return cls(binary)
        binary.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / SOURCE, Path(tmp) / "limit"
            src.write_bytes(source)
            done = subprocess.run([cc, *CFLAGS, "-o", str(out), str(src)], capture_output=True, text=True)
            if done.returncode != 0:
                raise LimitUnavailable(f"{cc} could not build {SOURCE}: {done.stderr.strip()[-2000:]}")
            os.replace(out, binary)  # atomic: a concurrent bench sees all of it or none
        return cls(binary)

    def run(self, dump: str, mode: str) -> float:
        """One page-in in ``mode`` of the guest in ``dump``; returns data pages per second."""
        return float(self.run_report(dump, mode)["pages_per_s"])

    def run_report(self, dump: str, mode: str) -> dict[str, Any]:
        try:
            done = subprocess.run([str(self.binary), dump, mode], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"limit {mode}: the C page-in did not finish within {RUN_TIMEOUT_S} s") from None
        try:
            report: dict[str, Any] = json.loads(done.stdout)
        except json.JSONDecodeError:
            report = {}
        if done.returncode != 0 or not report:
            raise BenchError(f"limit {mode}: the C page-in failed (exit {done.returncode}): "
                             f"{done.stderr.strip() or done.stdout.strip()}")
        return report


def dump_guest(size: int, vcpus: int) -> str:
    """Boot the pagein guest as section pagein does and write what limit.c needs; returns the path."""
    from postcopy.bench.pagein import boot
    machine = boot(size, vcpus)
    try:
        low = machine.memory.read(0, DATA_GPA)
        state = b"".join(bytes(t.vcpu.get_regs()) + bytes(t.vcpu.get_sregs()) for t in machine.vcpus)
        regs_size, sregs_size = (len(bytes(x)) for x in (machine.vcpus[0].vcpu.get_regs(), machine.vcpus[0].vcpu.get_sregs()))
        header = DUMP_HEADER.pack(DUMP_MAGIC, vcpus, len(machine.cpuid), size, len(low), regs_size, sregs_size,
                                  GS_PORT, GS_EXCEPTION, GS_DONE, 0)
    finally:
        machine.close()
    fd, path = tempfile.mkstemp(prefix="postcopy-limit-", suffix=".dump")
    with os.fdopen(fd, "wb") as f:
        f.write(header + low + state + machine.cpuid)
    return path


def remove_dump(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def run(opts: BenchOptions) -> dict[str, Any]:
    from postcopy.bench import pagein
    m = pagein.measure(opts)
    if m["limit_skipped"]:
        return {"skipped": m["limit_skipped"]}
    runs = m["rates"]["limit"]
    out: dict[str, Any] = pagein.medians(runs)
    out["ratio_exit_classic"], out["best_classic"] = pagein.exit_against_best_classic(runs)
    out["mem_mib"], out["pages"], out["repeat"] = m["mem_mib"], m["pages"], m["repeat"]
    out["naive_repeat"] = m["naive_repeat"]
    out["runs"] = m["rates"]["limit"]
    return out


def table(result: dict[str, Any]) -> list[str]:
    from postcopy.bench.pagein import MODES, best_classic_row
    if "skipped" in result:
        return [f"limit: skipped: {result['skipped']}"]
    vs = sorted(result["exit"], key=int)
    lines = [f"limit (C, same guest and modes): {result['mem_mib']} MiB, median of {result['repeat']}",
             "  mode            " + "".join(f"{v + ' vCPU':>14}" for v in vs) + "   (pages/s)"]
    lines += [f"  {mode:<16}" + "".join(f"{result[mode][v]:>14,.0f}" for v in vs) for mode in MODES]
    lines.append(best_classic_row(result))
    return lines
