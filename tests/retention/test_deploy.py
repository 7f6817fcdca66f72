"""The daily systemd unit: the units verify, and the wrapper runs enforce, scrub and yesterday's audit for real."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from .conftest import EXAM_RETENTION, REPO, Env
from .test_enforce import arrived

UNITS = REPO / "deploy" / "systemd"
SCRIPT = UNITS / "exam-retention.sh"


def test_units_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze unavailable")
    service = (UNITS / "exam-retention.service").read_text()
    assert "ExecStart=/opt/exam-footage/deploy/systemd/exam-retention.sh" in service
    # verify wants ExecStart to exist: point it at this checkout's script
    (tmp_path / "exam-retention.service").write_text(
        service.replace("/opt/exam-footage/deploy/systemd/exam-retention.sh", str(SCRIPT)))
    shutil.copy(UNITS / "exam-retention.timer", tmp_path / "exam-retention.timer")
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "exam-retention.service"),
                           str(tmp_path / "exam-retention.timer")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "exam-retention" not in proc.stderr, proc.stderr  # no warnings about our units
    cal = subprocess.run(["systemd-analyze", "calendar", "*-*-* 02:30:00 Asia/Shanghai"], capture_output=True,
                         text=True)
    assert cal.returncode == 0 and "Next elapse" in cal.stdout


def test_daily_script_runs_all_three_steps(env: Env, tmp_path: Path) -> None:
    old = env.store("t101-front", datetime(2024, 6, 1, 1, 0, tzinfo=timezone.utc))
    arrived(env, [old])   # uploaded back then: its keep counts from the later of its end and its arrival
    yesterday = (datetime.now(ZoneInfo("Asia/Shanghai")) - timedelta(days=1)).date()
    # Yesterday's footage for the audit: a camera with seq 2 missing (a gap, exit 3 expected).
    start = datetime.combine(yesterday, datetime.min.time(), tzinfo=ZoneInfo("Asia/Shanghai")) + timedelta(hours=9)
    env.store("t101-back", start.astimezone(timezone.utc), seq=1)
    env.store("t101-back", start.astimezone(timezone.utc) + timedelta(seconds=4), seq=3, clip=1)
    reports = tmp_path / "reports"
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=600, env={
        **os.environ, "EXAM_COLLECTOR_CONFIG": str(env.config), "EXAM_RETENTION": str(EXAM_RETENTION),
        "EXAM_RETENTION_REPORT_DIR": str(reports), "EXAM_RETENTION_SCRUB_SAMPLE": "0.5"})
    assert proc.returncode == 3, proc.stdout + proc.stderr     # the gap, after enforce and scrub succeeded
    assert "delete 1 files" in proc.stdout and "re-hashed 1 files" in proc.stdout
    assert "'audit' exited 3" in proc.stderr and "'enforce'" not in proc.stderr and "'scrub'" not in proc.stderr
    assert not (env.storage / old.storage_path).exists()
    assert "片段序号缺失" in (reports / f"audit-{yesterday}.html").read_text(encoding="utf-8")
    assert (reports / f"audit-{yesterday}.json").exists()
