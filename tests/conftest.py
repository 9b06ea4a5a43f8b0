"""Shared fixtures: skip tests that need a kernel device this host lacks."""
from __future__ import annotations

import os

import pytest

KVM_DEVICE = "/dev/kvm"
UFFD_DEVICE = "/dev/userfaultfd"


def _require(path: str, why: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent: {why}")
    if not os.access(path, os.R_OK | os.W_OK):
        pytest.skip(f"{path} is not readable and writable by this user: {why}")


@pytest.fixture
def kvm_available() -> None:
    """Skips the test when /dev/kvm is missing or not usable."""
    _require(KVM_DEVICE, "this test runs a real KVM guest")


@pytest.fixture
def uffd_available() -> None:
    """Skips the test when /dev/userfaultfd is missing or not usable."""
    _require(UFFD_DEVICE, "this test uses a real userfaultfd")
