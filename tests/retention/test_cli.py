"""exam-retention CLI edges: bad config (1), unreachable database (2), disk pressure only raises an alarm."""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import select

from collector.models import SegmentRecord
from tests.support.services import free_port, small_filesystem

from .conftest import EXAM_RETENTION, Env


def _run(config: Path, *args: str):  # noqa: ANN202
    import subprocess

    return subprocess.run([str(EXAM_RETENTION), "--config", str(config), *args], capture_output=True, text=True,
                          timeout=120)


def test_missing_config_exit_1(tmp_path: Path) -> None:
    proc = _run(tmp_path / "nope.toml", "enforce", "--dry-run")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"exam-retention: error: config file {tmp_path / 'nope.toml'} does not exist: create it "
                           "with `exam-collector init` or pass --config PATH\n")


def test_unreachable_database_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    port = free_port()
    config.write_text(f'[collector]\ndata_dir = "{tmp_path}"\n'
                      f'database_url = "postgresql+psycopg://postgres@127.0.0.1:{port}/test"\n'
                      '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n')
    for args in (["enforce", "--dry-run"], ["verify-log", "--pubkey", "A" * 43 + "="], ["scrub"]):
        proc = _run(config, *args)
        assert proc.returncode == 2, proc.stderr
        assert f"127.0.0.1:{port}/test is unreachable" in proc.stderr


def test_full_disk_raises_alarm_and_deletes_nothing_extra(env: Env, capsys) -> None:
    with small_filesystem(env.storage, 2048):
        (env.storage / "staging").mkdir()
        recent = env.store("t101-front", datetime.now(timezone.utc) - timedelta(days=2))
        free = shutil.disk_usage(env.storage).free
        with open(env.storage / "filler", "wb") as handle:  # leave ~3 % free
            handle.write(b"\0" * (free - int(0.03 * shutil.disk_usage(env.storage).total)))
            os.fsync(handle.fileno())
        code, out, err = env.run(capsys, "enforce")
        assert code == 0, err
        assert "ALARM: storage" in err and "% full" in err and "never deletes footage early" in err
        assert "delete 0 files" in out
        assert (env.storage / recent.storage_path).exists()
        with env.sessions() as s:
            assert s.scalars(select(SegmentRecord)).one().deleted_at is None
