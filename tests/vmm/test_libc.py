"""vmm.libc.ends_with_parent: a child started with it ends when its parent does."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from vmm import libc

from procs import running  # type: ignore[import-not-found]

# A parent that starts a long-sleeping child with ends_with_parent, prints its pid, then waits.
PARENT = """
import subprocess, sys, time
from vmm.libc import ends_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=ends_with_parent())
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_ends_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert running(child)
        parent.kill()  # SIGKILL: the parent runs no cleanup of its own
        parent.wait()
        deadline = time.monotonic() + 10
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(child), "the child outlived its parent"
    finally:
        if running(child):
            os.kill(child, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_ends_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if the parent had died between the fork and the prctl: the pid it recorded is not the
    # child's parent, so the child ends before it runs anything, whatever handlers it inherited.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    monkeypatch.setattr(libc.os, "getpid", lambda: 1 << 30)
    preexec = libc.ends_with_parent()
    monkeypatch.undo()
    try:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=preexec)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert child.wait(10) == -signal.SIGKILL
