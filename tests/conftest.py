"""Shared fixtures: skip tests that need a kernel device this host lacks."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(slots=True)
class TlsFiles:
    ca: Path  # signed the server's certificate
    other_ca: Path  # did not
    cert: Path  # for IP 127.0.0.1 and localhost
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA and a server certificate it signed (openssl CLI), and a second CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is absent: TLS tests make their CA with it")
    d = tmp_path_factory.mktemp("tls")
    for name in ("ca", "other"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                 "-subj", f"/CN=postcopy test {name} CA", "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.pem", cwd=d)
    return TlsFiles(ca=d / "ca.pem", other_ca=d / "other.pem", cert=d / "server.pem", key=d / "server.key")
