"""Process state from /proc, for tests that check what outlives whom."""
from __future__ import annotations


def running(pid: int) -> bool:
    """Not exited: the process exists and is not a zombie nobody has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
