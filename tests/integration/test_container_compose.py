"""deploy/container/compose.yaml is a valid compose file that gives the VMMs their two devices and
no privilege beyond them (the container pair itself runs in CI: `make pair-container`)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "container" / "compose.yaml"


@pytest.fixture
def docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.skip("docker-compose is not installed (deploy/container/run-pair installs it with apt-get)")
    return path


def test_compose_file_is_valid_and_gives_only_the_devices(docker_compose: str, tmp_path: Path) -> None:
    for name in ("token", "api_token"):
        (tmp_path / name).write_text("t\n")
    env = dict(os.environ, PCV_IMAGE="postcopy-vmm:test", PCV_TOKEN_FILE=str(tmp_path / "token"),
               PCV_API_TOKEN_FILE=str(tmp_path / "api_token"))
    config = subprocess.run([docker_compose, "-f", str(COMPOSE), "config"], env=env, capture_output=True, text=True)
    assert config.returncode == 0, config.stderr  # it validates, then prints the file resolved
    resolved = config.stdout
    assert resolved.count("- /dev/kvm") == 2 and resolved.count("- /dev/userfaultfd") == 2  # source, destination
    for privilege in ("privileged", "cap_add", "security_opt", "seccomp"):
        assert privilege not in resolved
