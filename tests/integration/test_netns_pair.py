"""Two hosts on one machine: deploy/netns/run-pair migrates a running memtouch guest between two
network namespaces over a veth link, prints the demo's JSON, and removes what it made, also
when interrupted."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("kvm_available", "uffd_available")]
RUN_PAIR = Path(__file__).resolve().parents[2] / "deploy" / "netns" / "run-pair"
NAMESPACE = re.compile(r"pcv-(?:src|dst)-\d+")


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"`ip netns` does not work here: {probe.stderr.strip()}"


@pytest.fixture
def netns_available() -> None:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)


def _env() -> dict[str, str]:
    # run-pair uses the installed project: the one running these tests
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def _namespaces() -> set[str]:
    return set(NAMESPACE.findall(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout))


@pytest.mark.usefixtures("netns_available")
def test_netns_pair_migrates_a_verified_guest_and_removes_its_namespaces() -> None:
    done = subprocess.run([str(RUN_PAIR), "--json", "--mem", "64M", "--rate", "1gbit"], capture_output=True,
                          text=True, env=_env(), timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # stdout is the report and nothing else
    assert report["verified"] is True and report["guest_errors"] == 0, report
    assert report["guest_mib"] == 64 and report["vcpus"] == 2 and report["all_pages_present"] is True
    assert report["downtime_ms"] is not None
    made = set(NAMESPACE.findall(done.stderr))
    assert len(made) == 2, done.stderr  # it said which namespaces it made ...
    assert not made & _namespaces()  # ... and removed them


@pytest.mark.usefixtures("netns_available")
def test_netns_pair_interrupted_removes_namespaces_and_vmms() -> None:
    # A shell cannot trap a signal ignored when it started, and a runner in the background of a
    # non-interactive shell ignores SIGINT: the script gets the default back, as from a terminal.
    proc = subprocess.Popen([str(RUN_PAIR), "--json", "--mem", "64M"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 30
    made: set[str] = set()
    while len(made) < 2 and time.monotonic() < deadline:  # interrupt once both hosts exist
        made = {ns for ns in _namespaces() if ns.endswith(f"-{proc.pid}")}
        time.sleep(0.05)
    assert len(made) == 2, "run-pair never made its namespaces"
    time.sleep(0.5)  # the VMMs are starting inside them
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert not made & _namespaces()
    work = re.search(r"work dir (\S+)", err)
    assert work, err
    assert not Path(work[1]).exists()  # logs and token gone; no VMM runs with them any more
    assert subprocess.run(["pgrep", "-f", work[1]], capture_output=True).returncode == 1


def test_netns_pair_refuses_a_bad_flag_before_making_anything() -> None:
    done = subprocess.run([str(RUN_PAIR), "--vcpus", "0"], capture_output=True, text=True, env=_env(), timeout=30)
    assert done.returncode != 0 and "--vcpus" in done.stderr and done.stdout == ""


def test_netns_pair_names_a_bad_flag_before_a_missing_tool(tmp_path: Path) -> None:
    """A machine without iproute2 (seen on a second test host) still hears what is wrong with
    the command line first. Here every command on PATH is there but ip and tc."""
    for d in reversed(os.environ["PATH"].split(os.pathsep)):
        for tool in Path(d).glob("*") if Path(d).is_dir() else ():
            if tool.name not in ("ip", "tc"):
                (tmp_path / tool.name).unlink(missing_ok=True)
                (tmp_path / tool.name).symlink_to(tool)
    env = dict(_env(), PATH=f"{Path(sys.executable).parent}{os.pathsep}{tmp_path}")
    assert shutil.which("ip", path=env["PATH"]) is None
    done = subprocess.run([str(RUN_PAIR), "--fault-mode", "fast"], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode != 0 and "--fault-mode wants exit, classic or auto" in done.stderr, done.stderr
