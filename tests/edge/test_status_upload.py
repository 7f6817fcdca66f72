"""The `upload` part of the agent's status: its fields (status.json and the retained topic), the human line of
`exam-edge status` in Chinese and English, and the CLI showing the configured cap while no agent runs."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from edge_agent.config import load_config
from edge_agent.journal import Journal
from edge_agent.ratecap import CapState, UploadRate
from edge_agent.status import LocalStatus, StatusReporter, UploadStatus, read_local_status, upload_line
from tests.edge.conftest import write_config

UTC = timezone.utc
NIGHT = datetime(2026, 12, 2, 14, 0, tzinfo=UTC)   # 22:00 Asia/Shanghai


def test_fields_round_trip_and_the_drain_estimate() -> None:
    capped = UploadStatus.of(UploadRate(CapState(8000, NIGHT, 0), 0.0), 12, 360_000_000)
    assert capped == UploadStatus(cap_kbps=8000, cap_changes_at=NIGHT, cap_next_kbps=0, rate_kbps=0.0,
                                  backlog_records=12, backlog_bytes=360_000_000, backlog_eta_seconds=360)
    body = json.loads(json.dumps(capped.to_json()))
    assert body == {"cap_kbps": 8000, "cap_changes_at": "2026-12-02T14:00:00.000Z", "cap_next_kbps": 0,
                    "rate_kbps": 0.0, "backlog_records": 12, "backlog_bytes": 360_000_000,
                    "backlog_eta_seconds": 360, "batch_backlog_records": 0, "batch_backlog_bytes": 0,
                    "batch_backlog_eta_seconds": None}
    assert UploadStatus.from_json(body) == capped
    measured = UploadStatus.of(UploadRate(CapState(0), 500_000.0), 3, 90_000_000)
    assert measured.rate_kbps == 4000.0 and measured.backlog_eta_seconds == 180 and measured.cap_changes_at is None
    assert UploadStatus.of(UploadRate(CapState(0), 0.0), 3, 1).backlog_eta_seconds is None


def test_batch_footage_in_the_backlog_drains_first_at_the_whole_rate() -> None:
    status = UploadStatus.of(UploadRate(CapState(8000), 0.0), 12, 360_000_000, (2, 30_000_000))
    assert (status.batch_backlog_records, status.batch_backlog_bytes) == (2, 30_000_000)
    assert status.batch_backlog_eta_seconds == 30 and status.backlog_eta_seconds == 360
    assert UploadStatus.from_json(json.loads(json.dumps(status.to_json()))) == status
    assert upload_line(status).endswith("；其中考试批次录像 2 条、30.0 MB（优先上传，预计 30 秒 传完）")
    assert upload_line(status, "en").endswith("; of it, exam batch footage 2 record(s), 30.0 MB (sent first, drains "
                                              "in about 30 s)")


def test_the_human_line_in_chinese_and_english() -> None:
    status = UploadStatus(cap_kbps=8000, cap_changes_at=NIGHT, cap_next_kbps=0, rate_kbps=7936.4,
                          backlog_records=12, backlog_bytes=345_600_000, backlog_eta_seconds=4620)
    assert upload_line(status) == ("上传：限速 8000 kbit/s（北京时间 2026-12-02 22:00 起为 不限速）；近 1 分钟实测 "
                                   "7936.4 kbit/s；积压 12 条记录、345.6 MB；预计 1 小时 17 分 传完")
    assert upload_line(status, "en") == ("upload: cap 8000 kbit/s (unlimited from 2026-12-02 22:00 Asia/Shanghai); "
                                         "measured 7936.4 kbit/s over the last minute; backlog 12 record(s), "
                                         "345.6 MB; drains in about 1 h 17 min")
    idle = UploadStatus(0, None, None, 0.0, 0, 0, 0)
    assert upload_line(idle) == "上传：限速 不限速；近 1 分钟实测 0.0 kbit/s；积压 0 条记录、0.0 MB；已全部上传"
    unknown = UploadStatus(0, None, None, 0.0, 2, 5_000_000, None)
    assert upload_line(unknown, "en").endswith("backlog 2 record(s), 5.0 MB; time to drain unknown")


def test_reporter_writes_the_upload_fields(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    config.agent.data_dir.mkdir(parents=True)
    journal = Journal(config.agent.journal_path)
    try:
        rate = UploadRate(CapState(2000, NIGHT, 0), 250_000.0)
        published: dict = {}
        reporter = StatusReporter(config, journal, dict, lambda **fields: published.update(fields),
                                  upload=lambda: rate)
        reporter.report()
    finally:
        journal.close()
    assert published["upload"] == {"cap_kbps": 2000, "cap_changes_at": "2026-12-02T14:00:00.000Z",
                                   "cap_next_kbps": 0, "rate_kbps": 2000.0, "backlog_records": 0,
                                   "backlog_bytes": 0, "backlog_eta_seconds": 0, "batch_backlog_records": 0,
                                   "batch_backlog_bytes": 0, "batch_backlog_eta_seconds": None}
    local = read_local_status(config)
    assert isinstance(local, LocalStatus) and local.upload == UploadStatus.from_json(published["upload"])


def test_cli_shows_the_configured_cap_and_its_next_change_without_a_running_agent(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text() + '\n[upload]\nmax_kbps = 8000\n[[upload.schedule]]\nfrom = "22:00"\n'
                    'to = "06:00"\nmax_kbps = 0\n')
    config = load_config(path)
    config.agent.data_dir.mkdir(parents=True)
    Journal(config.agent.journal_path).close()
    exe = str(Path(sys.executable).parent / "exam-edge")
    zh = subprocess.run([exe, "--config", str(path), "status"], capture_output=True, text=True, timeout=60)
    en = subprocess.run([exe, "--config", str(path), "status", "--lang", "en"], capture_output=True, text=True,
                        timeout=60)
    assert zh.returncode == 0 and en.returncode == 0, zh.stderr + en.stderr
    line_zh, line_en = zh.stdout.splitlines()[-1], en.stdout.splitlines()[-1]
    assert line_zh.startswith("上传：限速 ") and "北京时间 " in line_zh and line_zh.endswith("已全部上传")
    assert line_en.startswith("upload: cap ") and "Asia/Shanghai" in line_en and line_en.endswith("nothing to drain")
    # whichever side of the window it is now, the other cap comes next
    assert ("限速 8000 kbit/s（北京时间" in line_zh and "06:00" not in line_zh) or \
        ("限速 不限速（北京时间" in line_zh and " 06:00 起为 8000 kbit/s" in line_zh)
