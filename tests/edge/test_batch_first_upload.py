"""Batch-first upload end to end: a real collector (service, database, schedule loop) and the agent's uploader over
a real mosquitto. The agent's backlog holds several cameras' segments; the collector's schedule names a batch
in two of its rooms, and the segments of those rooms in those windows are stored first, the rest after."""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from collector.admin import enroll
from collector.batches import import_batches
from collector.config import MqttConfig
from collector.db import make_engine, session_factory, upgrade
from collector.ingest import Ingest
from collector.models import SegmentRecord
from collector.schedule import Horizon, ScheduleLoop
from collector.service import CollectorService
from edge_agent.config import load_config
from edge_agent.spool import Journal, Sealer
from edge_agent.uploader import Uploader
from exam_contract.signing import load_private_key, public_key_b64
from tests.collector.conftest import TEST_LIMITS
from tests.edge.conftest import AGENT, Cam, write_config
from tests.support.pipeline import wait_until

pytestmark = [pytest.mark.ffmpeg, pytest.mark.mosquitto]
UTC = timezone.utc
SHANGHAI = timezone(timedelta(hours=8))
CAMS = (Cam("t101-front", "T101", "theory"), Cam("p201-side", "P201", "practical"),
        Cam("t301-front", "T301", "theory"))


def shanghai(moment: datetime) -> str:
    return moment.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")


def test_segments_in_a_batch_window_are_stored_first_and_everything_in_the_end(tmp_path: Path, mosquitto,
                                                                               sample_ts: Path) -> None:
    config = load_config(write_config(tmp_path / "edge", broker_url=mosquitto.url, cameras=CAMS))
    journal = Journal(config.agent.journal_path)
    sealer = Sealer(config, journal, load_private_key(config.agent.key_file))
    # The backlog: three segments of each camera, 10 minutes apart, journaled in time order across cameras.
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    for index in range(3):
        for cam in CAMS:
            target = config.agent.recording_dir / cam.id / f"20261126T080000000000-{index:06d}.ts"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample_ts, target)
            end = (base + timedelta(minutes=10 * (index + 1))).timestamp()
            os.utime(target, (end, end))      # no run anchor: the file's last write is the segment's end
            sealer.seal_file(cam.id, target)
    journaled = [r.file_id for r in journal.records()]
    assert journaled == [f"{c.id}-{i}" for i in (1, 2, 3) for c in CAMS]

    engine = make_engine(f"sqlite:///{tmp_path / 'collector.db'}")
    upgrade(engine)
    sessions = session_factory(engine)
    enroll(sessions, AGENT, config.agent.venue, public_key_b64(load_private_key(config.agent.key_file)),
           config.agent.institution)
    # Batch B-1: P201 over the first two segments' time; batch B-2, later: T301 over the third.
    rows = [("B-1", "practical", "P201", base + timedelta(minutes=5), base + timedelta(minutes=25)),
            ("B-2", "theory", "T301", base + timedelta(minutes=28), base + timedelta(minutes=35))]
    csv = "batch_id,institution,venue,occupation,level,part,room,start,end\n" + "".join(
        f"{b},{config.agent.institution},{config.agent.venue},电工,四级,{part},{room},{shanghai(s)},{shanghai(e)}\n"
        for b, part, room, s, e in rows)
    with sessions.begin() as session:
        import_batches(session, csv.encode(), source="batches.csv", actor="tester")

    service = CollectorService(MqttConfig(url=mosquitto.url, host="127.0.0.1", port=mosquitto.port, tls=False,
                                          client_id=f"collector-test-{uuid.uuid4().hex[:6]}"),
                               Ingest(engine, tmp_path / "storage", limits=TEST_LIMITS), workers=1,
                               queue_size=100, finishers=1)
    schedules = ScheduleLoop(sessions, Horizon(timedelta(0), timedelta(0)), interval=1.0,
                             publish=lambda topic, payload: service.client.publish(
                                 topic, payload, qos=1, retain=True).rc == 0)
    # One record at a time, so the order the collector stores them in is the order the agent started them.
    uploader = Uploader(config, journal, chunk_size=64 * 1024, max_active=1, reply_timeout=2.0)
    try:
        service.start()
        assert service.connected.wait(10)
        schedules.start()
        uploader.connect()
        # The retained schedule reaches the agent on connecting; the send loop starts once it has it (an agent
        # already sending when it arrives has started at most its free slots' records in the journal's order).
        wait_until(lambda: uploader._order.active, 20, 0.1, "the schedule to reach the agent")
        uploader.start()
        wait_until(lambda: journal.pending_count() == 0, 120, 0.5, "every record stored")
    finally:
        uploader.stop()
        schedules.stop()
        service.shutdown()
    with sessions() as session:
        stored = list(session.scalars(select(SegmentRecord).order_by(SegmentRecord.id)))
    engine.dispose()
    assert [r.state for r in journal.records()] == ["stored"] * 9
    journal.close()
    order = [r.file_id for r in stored]
    assert [r.stored_at for r in stored] == sorted(r.stored_at for r in stored)
    # B-1's window first (P201's first two segments), then B-2's (T301's third), then the rest oldest first.
    assert order == ["p201-side-1", "p201-side-2", "t301-front-3",
                     "t101-front-1", "t301-front-1", "t101-front-2", "t301-front-2", "t101-front-3", "p201-side-3"]
