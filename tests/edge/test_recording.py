"""Real ffmpeg (lavfi testsrc2, 10 s segments) through the real agent wiring, with a real broker."""

from __future__ import annotations

import os
import signal
from datetime import datetime, timezone
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.spool import Journal, probe_segment
from exam_contract.canonical import sha256_hex
from exam_contract.manifest import Manifest, segment_file_name
from exam_contract.signing import load_private_key, verify
from tests.edge.conftest import write_config
from tests.support.pipeline import sha256_file, wait_until

pytestmark = [pytest.mark.ffmpeg, pytest.mark.mosquitto]
CAM = "t101-front"


def manifests(journal: Journal) -> list[Manifest]:
    return [Manifest.from_dict(r.manifest_raw) for r in journal.records(CAM)]


def check_chain(journal: Journal, key) -> None:
    records = journal.records(CAM)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    prev = None
    for record in records:
        raw = record.manifest_raw
        assert raw["prev"] == prev
        assert record.record_hash == sha256_hex(record.manifest_json.encode())
        assert verify(key.public_key(), record.manifest_json.encode(), record.signature)
        prev = record.record_hash


def test_segments_kill_restart_and_agent_restart(tmp_path: Path, mosquitto, ffmpeg_available) -> None:
    config = load_config(write_config(tmp_path, broker_url=mosquitto.url))
    key = load_private_key(config.agent.key_file)
    before = datetime.now(timezone.utc)
    agent = Agent(config, key, drain_seconds=0)
    agent.connect()
    agent.start()
    recorder = agent.recorders.by_camera[CAM]
    try:
        # one full segment, then SIGKILL ffmpeg a few seconds into the second
        wait_until(lambda: len(agent.journal.records(CAM)) >= 1, 40, what="first segment")
        first_sealed = datetime.now(timezone.utc)
        killed_pid = recorder.pid()
        assert killed_pid is not None
        wait_until(lambda: any((config.agent.recording_dir / CAM).glob("*.ts"))
                   and os.path.getsize(next((config.agent.recording_dir / CAM).glob("*.ts"))) > 100_000,
                   20, what="second segment data")
        os.kill(killed_pid, signal.SIGKILL)
        # partial segment, gap, then the new run's first full segment
        wait_until(lambda: len(agent.journal.records(CAM)) >= 4, 60, what="segment after restart")
    finally:
        agent.stop()

    journal = Journal(config.agent.journal_path)
    ms = manifests(journal)
    records = journal.records(CAM)
    kinds = [m.kind for m in ms]
    assert kinds[:4] == ["segment", "segment", "gap", "segment"], kinds
    assert all(k == "segment" for k in kinds[4:])
    full, partial, gap, after = ms[:4]

    # wall-clock, millisecond names; start before the first seal, after the agent started
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= full.start <= first_sealed
    for m, r in zip(ms, records):
        if m.kind == "segment":
            assert r.path is not None and r.path.name == segment_file_name(CAM, m.start)
            assert r.path.parent == config.agent.spool_dir / CAM
            assert sha256_file(r.path) == m.sha256 and r.path.stat().st_size == m.size
            probe = probe_segment(r.path)  # readable MPEG-TS
            assert probe.video.codec == "h264" and (probe.video.width, probe.video.height) == (320, 240)
            # from ffmpeg's segment list (ffprobe reads only a run's first one): within a frame of ffprobe's
            assert abs(m.duration - probe.duration) <= 1 / probe.video.fps + 0.001, (m.duration, probe.duration)
            assert r.state == "pending"  # no collector: nothing is marked stored
    # a full segment is the configured length; the partial one is shorter and still readable
    assert round(full.duration) == 10 and round((full.end - full.start).total_seconds()) == 10
    assert 0 < partial.duration < 10
    assert partial.start == full.end  # contiguous within a run
    # the gap states the lost interval exactly: from the partial's end to the new run's first segment
    assert gap.cause == "recorder_crashed" and gap.start == partial.end and gap.end == after.start
    assert gap.detail and "SIGKILL" in gap.detail
    assert gap.sha256 is None and gap.size == 0
    assert round(after.duration) == 10
    for a, b in zip(ms[3:], ms[4:]):
        assert b.start == a.end
    check_chain(journal, key)
    assert not list((config.agent.recording_dir / CAM).glob("*.ts"))
    last_seq = records[-1].seq
    last_end = ms[-1].end
    journal.close()

    # agent restart: the journal continues seq and chain; the downtime is stated as agent_stopped
    agent = Agent(config, key, drain_seconds=0)
    agent.connect()
    agent.start()
    try:
        wait_until(lambda: len(agent.journal.records(CAM)) >= last_seq + 2, 40, what="segment after agent restart")
    finally:
        agent.stop()
    journal = Journal(config.agent.journal_path)
    ms = manifests(journal)
    gap, seg = ms[last_seq], ms[last_seq + 1]
    assert gap.kind == "gap" and gap.cause == "agent_stopped"
    assert gap.seq == last_seq + 1 and gap.start == last_end and gap.end == seg.start
    assert seg.kind == "segment"
    check_chain(journal, key)
    journal.close()
