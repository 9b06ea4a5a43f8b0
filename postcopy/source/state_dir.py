"""The source's state directory: what a page server needs to be started again after it died.

    DIR/ram             guest RAM, the file the guest ran on (file backing, MAP_SHARED): on tmpfs
                        (/dev/shm) it is memory that outlives the process
    DIR/header.msgpack  the MigrationHeader exactly as sent at the switchover
    DIR/resume.json     migration id and token (the per-migration secret)

Everything is mode 0600 in a 0700 directory, written before the header is answered (write to a
temporary name, fsync, rename), so a server killed at any point after the switchover can be
restarted with ``postcopy source --resume DIR --listen HOST:PORT`` and serve the same pages.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from proto import MigrationHeader, ProtoError
from vmm.memory import GuestMemory, GuestMemoryError

__all__ = ["RAM", "HEADER", "RESUME", "ResumeRecord", "StateDirError", "prepare", "save", "load", "remove"]

RAM: Final = "ram"
HEADER: Final = "header.msgpack"
RESUME: Final = "resume.json"
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600


class StateDirError(Exception):
    """The state directory is missing, incomplete or does not fit; the message says which file."""


@dataclass(slots=True)
class ResumeRecord:
    migration_id: str
    token: str


def prepare(state_dir: str) -> str:
    """Create the directory (0700) for a new migration; returns the path for guest RAM."""
    path = Path(state_dir)
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path, DIR_MODE)
    except OSError as e:
        raise StateDirError(f"cannot create state directory {path}: {e.strerror}") from None
    if (path / HEADER).exists() or (path / RAM).exists():
        raise StateDirError(f"state directory {path} already holds a migration: resume it or choose another")
    return str(path / RAM)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:  # a write may take less than asked (a filling disk): the rest, or its error
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save(state_dir: str, header_bytes: bytes, record: ResumeRecord) -> None:
    """At the switchover, before the header is answered: what a restarted server needs."""
    path = Path(state_dir)
    _write(path / RESUME, json.dumps(asdict(record)).encode())
    _write(path / HEADER, header_bytes)


def load(state_dir: str) -> tuple[MigrationHeader, bytes, ResumeRecord, GuestMemory]:
    """The header (decoded and as bytes), the record and the guest's RAM, mapped from its file."""
    path = Path(state_dir)
    try:
        header_bytes = (path / HEADER).read_bytes()
        raw = json.loads((path / RESUME).read_text())
        record = ResumeRecord(migration_id=str(raw["migration_id"]), token=str(raw["token"]))
    except FileNotFoundError as e:
        raise StateDirError(f"{e.filename} is missing: {path} holds no migration that reached its switchover") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StateDirError(f"cannot read the state in {path}: {e}") from None
    try:
        header = MigrationHeader.decode(header_bytes)
    except ProtoError as e:
        raise StateDirError(f"{path / HEADER} is not a valid migration header: {e}") from None
    if header.migration_id != record.migration_id:
        raise StateDirError(f"{path / HEADER} is for migration {header.migration_id!r}, "
                            f"{path / RESUME} for {record.migration_id!r}")
    try:
        memory = GuestMemory.open_file(str(path / RAM), [(r.gpa, r.size) for r in header.regions])
    except GuestMemoryError as e:
        raise StateDirError(str(e)) from None
    return header, header_bytes, record, memory


def remove(state_dir: str) -> None:
    """After Complete: the destination holds every page; give the RAM file's memory back."""
    path = Path(state_dir)
    for name in (RAM, HEADER, RESUME):
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass  # not empty: something else lives there
