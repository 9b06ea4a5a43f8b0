"""The source's state directory: saved at the switchover, loaded by a restarted page server."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from postcopy.source import state_dir as states
from postcopy.source.state_dir import ResumeRecord, StateDirError
from proto import PAGE_SIZE
from vmm.memory import GuestMemory

from served_memory import served_header  # type: ignore[import-not-found]


def _new_migration(path: Path) -> GuestMemory:
    ram = states.prepare(str(path))
    memory = GuestMemory.create(16 * PAGE_SIZE, "file", path=ram)
    memory.write(3 * PAGE_SIZE, b"\x5a" * PAGE_SIZE)
    header = served_header(memory, "mig-abc")
    states.save(str(path), header.encode(), ResumeRecord("mig-abc", "tok"))
    return memory


def test_a_saved_migration_loads_back_with_its_header_token_and_ram(tmp_path: Path) -> None:
    path = tmp_path / "state"
    _new_migration(path).close()  # the first server dies: its mapping goes, the file stays
    assert os.stat(path).st_mode & 0o777 == 0o700
    for name in (states.RAM, states.HEADER, states.RESUME):
        assert os.stat(path / name).st_mode & 0o777 == 0o600, name
    header, header_bytes, record, memory = states.load(str(path))
    try:
        assert record == ResumeRecord("mig-abc", "tok") and header.migration_id == "mig-abc"
        assert header.encode() == header_bytes
        assert memory.read(3 * PAGE_SIZE, PAGE_SIZE) == b"\x5a" * PAGE_SIZE
    finally:
        memory.close()
    states.remove(str(path))
    assert not path.exists()


def test_writes_that_take_less_than_asked_still_save_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.write may write less than it was given (a filling disk): the save goes on with the rest."""
    real_write, calls = os.write, []

    def short_write(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real_write(fd, bytes(data[:100]))
    monkeypatch.setattr(states.os, "write", short_write)
    path = tmp_path / "state"
    _new_migration(path).close()
    monkeypatch.undo()
    assert len(calls) > 2
    header, header_bytes, record, memory = states.load(str(path))
    memory.close()
    assert record == ResumeRecord("mig-abc", "tok") and header.encode() == header_bytes


def test_a_state_directory_in_use_is_not_reused(tmp_path: Path) -> None:
    _new_migration(tmp_path).close()
    with pytest.raises(StateDirError, match="already holds a migration"):
        states.prepare(str(tmp_path))


def test_an_incomplete_or_mismatched_state_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StateDirError, match="is missing: .* holds no migration that reached its switchover"):
        states.load(str(tmp_path))
    _new_migration(tmp_path).close()
    (tmp_path / states.RESUME).write_text('{"migration_id": "mig-other", "token": "t"}')
    with pytest.raises(StateDirError, match="is for migration 'mig-abc'.*for 'mig-other'"):
        states.load(str(tmp_path))
    (tmp_path / states.HEADER).write_bytes(b"\x93garbage")
    with pytest.raises(StateDirError, match="not a valid migration header"):
        states.load(str(tmp_path))


def test_source_resume_of_an_empty_directory_fails_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "postcopy.cli", "source", "--resume", str(tmp_path),
                           "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("postcopy source: error: ") and "holds no migration" in proc.stderr
