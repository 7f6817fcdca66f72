"""deploy/systemd units for exam-edge and exam-collector pass `systemd-analyze verify`, hardened."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _unavailable
from tests.support.deploy_broker import DEPLOY

UNITS = ("exam-edge.service", "exam-collector.service")
INSTALL_VENV = "/opt/exam-footage/.venv"
HARDENING = ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
             "CapabilityBoundingSet=", "SystemCallFilter=@system-service", "RestrictAddressFamilies=")


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_hardened_with_a_dedicated_user(unit: str) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    found = directives(text)
    user = unit.removesuffix(".service")
    assert found["User"] == [user] and found["Group"] == [user]
    for line in HARDENING:
        assert line in text, line
    assert f"/var/lib/{user}" in found["ReadWritePaths"][0].split()
    assert found["ExecStart"][0].startswith(f"{INSTALL_VENV}/bin/{user} ")


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        _unavailable("systemd-analyze (apt-get install systemd)")
    # verify insists that ExecStart exists: point the install prefix at this checkout's venv, nothing else.
    venv = str(Path(sys.executable).parent.parent)
    paths = []
    for unit in UNITS:
        text = (DEPLOY / "systemd" / unit).read_text()
        assert INSTALL_VENV in text
        path = tmp_path / unit
        path.write_text(text.replace(INSTALL_VENV, venv))
        paths.append(str(path))
    result = subprocess.run([tool, "verify", *paths], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
