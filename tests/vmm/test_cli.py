"""`python -m vmm.cli run`: a real guest from the command line, and its one-line config errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from procs import REPO, child_env  # type: ignore[import-not-found]

TIMEOUT_S = 60


def _vmm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)


@pytest.mark.usefixtures("kvm_available")
def test_run_memtouch_prints_json_with_verified_pages_and_no_errors() -> None:
    # 4M, not 64M: this host emulates guest ring-0 code (~1.5 M instr/s), so memtouch fills and
    # sweeps 64 MiB in ~40 s each; 4 MiB takes ~1.3 s.
    proc = _vmm("run", "--mem", "4M", "--vcpus", "1", "--workload", "memtouch", "--seconds", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["workload"] == "memtouch" and summary["vcpus"] == 1 and summary["guest_mib"] == 4
    assert summary["pages_verified"] > 0
    assert summary["errors"] == 0 and summary["guest_exceptions"] == 0
    assert summary["ok"] is True and summary["error"] is None
    assert summary["swept_pages"] > 0
    assert "Traceback" not in proc.stderr


@pytest.mark.usefixtures("kvm_available")
def test_run_touch_exits_zero_with_an_ok_summary() -> None:
    proc = _vmm("run", "--mem", "16M", "--vcpus", "1", "--workload", "touch", "--seconds", "0.5", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True and summary["errors"] == 0 and summary["workload"] == "touch"


@pytest.mark.parametrize("args,says", [
    (["--mem", "1000"], "4096"),
    (["--mem", "1M"], "data pages"),
    (["--mem", "lots"], "memory size"),
    (["--workload", "nope"], "nope"),
    (["--vcpus", "0"], "vCPUs"),
])
def test_bad_config_exits_nonzero_with_one_error_line_and_no_traceback(args: list[str], says: str) -> None:
    proc = _vmm("run", "--seconds", "0.1", *args)
    assert proc.returncode not in (0, None)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmm: error: ") and says in lines[0], lines[0]
    assert proc.stdout == ""
