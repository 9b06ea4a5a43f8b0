"""Fixtures for page-server tests that need no guest: guest RAM with a known pattern and a
header that describes it (what a resumed page server serves), and a throwaway TLS CA."""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proto import PAGE_SIZE, MemoryRegion, MigrationHeader, VcpuState, VmState
from vmm.memory import GuestMemory

SERVED_BYTES = 4 << 20
SERVED_TOKEN = "served-token"


@dataclass(slots=True)
class Served:
    memory: GuestMemory
    header: MigrationHeader


def served_header(memory: GuestMemory, migration_id: str = "mig-served") -> MigrationHeader:
    vcpu = VcpuState(id=0, regs=b"r" * 144, sregs=b"s" * 312, fpu=b"", xsave=b"", xcrs=b"", lapic=b"",
                     events=b"", mp_state=b"", debugregs=b"", cpuid=b"", msrs=b"")
    return MigrationHeader(
        migration_id=migration_id, page_size=PAGE_SIZE,
        regions=tuple(MemoryRegion(r.gpa, r.size) for r in memory.regions), vcpus=(vcpu,),
        vm_state=VmState(b"", [], b""), devices={}, eager=(), zero_bitmap=bytes((memory.pages + 7) // 8),
        paused_at_ns=1, boot_id="test-boot", workload={"name": "pattern"})


@pytest.fixture
def served() -> Iterator[Served]:
    """4 MiB of guest RAM: page i holds byte (i % 251) + 1 everywhere, but every 8th page is zero."""
    memory = GuestMemory.create(SERVED_BYTES, "anon")
    for page in range(memory.pages):
        if page % 8:
            memory.write(page * PAGE_SIZE, bytes([page % 251 + 1]) * PAGE_SIZE)
    try:
        yield Served(memory, served_header(memory))
    finally:
        memory.close()


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
