"""Fixtures for page-server tests that need no guest."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from served_memory import SERVED_BYTES, Served, fill_pattern, served_header  # type: ignore[import-not-found]
from vmm.memory import GuestMemory


@pytest.fixture
def served() -> Iterator[Served]:
    """4 MiB of guest RAM in a known pattern (served_memory.fill_pattern) and its header."""
    memory = GuestMemory.create(SERVED_BYTES, "anon")
    fill_pattern(memory)
    try:
        yield Served(memory, served_header(memory))
    finally:
        memory.close()
