"""A venue machine is replaced (new key, no journal) between two recordings, with the real CLIs, mosquitto and
ffmpeg. The new agent continues each camera's chain from the collector's newest record instead of restarting
at seq 1: nothing is rejected, the chain stays whole across both keys, the break is a stated gap and an
audit entry, and every record still verifies with the key that signed it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from collector.models import AuditEntry, IngestEvent, SegmentRecord
from tests.support.pipeline import CameraSpec, Pipeline, read_journal, wait_until
from tests.support.services import lavfi_source

CAMERA = "t101-front"


def stored(pipeline: Pipeline) -> list[SegmentRecord]:
    engine = create_engine(pipeline.database_url)
    try:
        with Session(engine) as session:
            rows = list(session.scalars(select(SegmentRecord).where(SegmentRecord.camera == CAMERA)
                                        .order_by(SegmentRecord.seq)))
            session.expunge_all()
        return rows
    finally:
        engine.dispose()


def pending(pipeline: Pipeline) -> int:
    rows = read_journal(pipeline.edge_data / "journal.sqlite", "select count(*) from records where state != 'stored'")
    return rows[0][0] if rows else 0


def test_replaced_machine_continues_the_chain(tmp_path: Path, mosquitto, ffmpeg_available) -> None:
    pipeline = Pipeline(tmp_path, mosquitto.url, database_url=f"sqlite:///{tmp_path / 'collector.db'}",
                        segment_seconds=10, cameras=[CameraSpec(CAMERA, "T101", "theory", lavfi_source(rate=10))])
    pipeline.set_up()
    text = pipeline.edge_config.read_text()
    pipeline.edge_config.write_text(re.sub(r"(?m)^enabled = true", "enabled = false", text))
    pipeline.start_collector()
    try:
        pipeline.start_agent()
        wait_until(lambda: len([r for r in stored(pipeline) if r.kind == "segment"]) >= 2, 90,
                   what="two segments stored from the first machine")
        assert pipeline.stop_agent() == 0, pipeline.logs()
        before = stored(pipeline)
        old_key = before[0].key_fingerprint

        pipeline.replace_edge_machine()
        text = pipeline.edge_config.read_text()
        pipeline.edge_config.write_text(re.sub(r"(?m)^enabled = true", "enabled = false", text))
        pipeline.start_agent()
        wait_until(lambda: len(stored(pipeline)) >= len(before) + 3 and pending(pipeline) <= 1, 120,
                   what="the new machine's records stored")
        assert pipeline.stop_agent() == 0, pipeline.logs()
        wait_until(lambda: pending(pipeline) == 0, 60, what="everything acknowledged")
    finally:
        pipeline.stop_collector()
        pipeline.close()

    after = stored(pipeline)
    agent_log = (tmp_path / "agent.log").read_text(errors="replace")
    assert f"continuing the collector's chain after seq {before[-1].seq}" in agent_log, pipeline.logs()
    # one unbroken chain 1..N across both machines and keys; nothing rejected
    assert [r.seq for r in after] == list(range(1, len(after) + 1))
    assert all(r.chain_status in ("first", "linked") for r in after)
    for earlier, later in zip(after, after[1:]):
        assert later.prev_hash == earlier.record_hash
    new_rows = after[len(before):]
    assert {r.key_fingerprint for r in before} == {old_key}
    assert {r.key_fingerprint for r in new_rows} == {new_rows[0].key_fingerprint} != {old_key}
    # the break is stated: a gap from the old machine's last record to the new one's first
    first_new = new_rows[0]
    assert first_new.kind == "gap" and json.loads(first_new.manifest)["cause"] == "agent_stopped"
    assert "journal started anew" in json.loads(first_new.manifest)["detail"]
    assert first_new.start_at == before[-1].end_at
    engine = create_engine(pipeline.database_url)
    with Session(engine) as session:
        rejected = list(session.scalars(select(IngestEvent).where(IngestEvent.event == "rejected")))
        heads = list(session.scalars(select(AuditEntry).where(AuditEntry.action == "agent.chain_heads")))
    engine.dispose()
    assert rejected == []
    assert len(heads) == 1 and json.loads(heads[0].detail)["heads"][CAMERA]["seq"] == before[-1].seq
    # every record verifies with the key that signed it; both keys are in the agent's history
    verify = pipeline.collector("summary", "--verify", "--lang", "en", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    keys = pipeline.collector("keys", "--agent", pipeline.agent, "--json")
    history = json.loads(keys.stdout)
    assert [k["fingerprint"] for k in history] == [old_key, first_new.key_fingerprint]
    assert history[0]["valid_to"] is not None and history[1]["valid_to"] is None
