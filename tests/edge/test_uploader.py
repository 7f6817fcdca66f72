"""The uploader against a real mosquitto; a plain paho client plays the collector's side of protocol v1."""

from __future__ import annotations

import shutil
import threading
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_agent.config import load_config
from edge_agent.spool import Journal, Sealer
from edge_agent.uploader import Uploader
from exam_contract.canonical import canonical_bytes, sha256_hex
from exam_contract.protocol import InitMessage, Reply
from exam_contract.topics import parse_segment_topic, reply_topic
from exam_contract.signing import load_private_key
from tests.edge.conftest import AGENT, write_config
from tests.support.pipeline import wait_until

pytestmark = [pytest.mark.ffmpeg, pytest.mark.mosquitto]
CAM = "t101-front"
CHUNK = 64 * 1024
LIMIT = 256 * 1024


class FakeCollectorSide:
    """Records what arrives on the segment topics; replies only when the test says so."""

    def __init__(self, port: int):
        self.inits: dict[str, list[InitMessage]] = defaultdict(list)
        self.chunks: dict[str, dict[int, bytes]] = defaultdict(dict)
        self.chunk_counts: dict[str, list[int]] = defaultdict(list)
        self.fins: dict[str, int] = defaultdict(int)
        self.fin_payloads: dict[str, set[bytes]] = defaultdict(set)
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-collector",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"exam/v1/{AGENT}/seg/#", qos=1)
        self.client.loop_start()

    def on_message(self, client, userdata, message) -> None:
        topic = parse_segment_topic(message.topic)
        with self.lock:
            if topic.part == "init":
                self.inits[topic.file_id].append(InitMessage.decode(message.payload))
            elif topic.part == "chunk":
                self.chunks[topic.file_id][topic.chunk_index] = bytes(message.payload)
                self.chunk_counts[topic.file_id].append(topic.chunk_index)
            else:
                self.fins[topic.file_id] += 1
                self.fin_payloads[topic.file_id].add(bytes(message.payload))

    def reply(self, file_id: str, state: str, missing=None, reason=None, record=None) -> None:
        body = Reply(file_id=file_id, state=state, collector_time=datetime.now(timezone.utc),
                     missing=missing or [], reason=reason, record=record).encode()
        self.client.publish(reply_topic(AGENT), body, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_upload_protocol_and_replies(tmp_path: Path, mosquitto, sample_ts: Path) -> None:
    config = load_config(write_config(tmp_path, broker_url=mosquitto.url))
    journal = Journal(config.agent.journal_path)
    sealer = Sealer(config, journal, load_private_key(config.agent.key_file))
    for index in range(2):
        target = config.agent.recording_dir / CAM / f"20261126T080000000000-{index:06d}.ts"
        shutil.copyfile(sample_ts, target)
        sealer.seal_file(CAM, target)
    sealer.note_outage(CAM, "camera_unreachable", "Connection refused")
    sealer.close_outages()
    records = journal.records(CAM)
    assert [r.kind for r in records] == ["segment", "segment", "gap"]
    ids = [r.file_id for r in records]

    side = FakeCollectorSide(mosquitto.port)
    uploader = Uploader(config, journal, chunk_size=CHUNK, max_inflight_bytes=LIMIT, reply_timeout=1.0)
    uploader.connect()
    uploader.start()
    try:
        wait_until(lambda: all(side.fins[i] >= 2 for i in ids), 60, what="fin, then fin repeated without reply")
        with side.lock:
            for record in records:
                init = side.inits[record.file_id][0]
                assert canonical_bytes(init.manifest_raw) == record.manifest_json.encode()
                assert init.signature == record.signature and init.chunk_size == CHUNK
                if record.kind == "segment":
                    data = b"".join(side.chunks[record.file_id][i] for i in range(init.chunks))
                    assert init.chunks == -(-record.size // CHUNK) > 4
                    assert sha256_hex(data) == record.manifest_raw["sha256"]
                else:
                    assert init.chunks == 0 and not side.chunks[record.file_id]
            # every fin names the record it finishes
            assert all(side.fin_payloads[r.file_id] == {r.record_hash.encode()} for r in records)
        # a PUBACK proves nothing: without a reply everything stays pending
        assert [r.state for r in journal.records(CAM)] == ["pending"] * 3
        assert uploader.peak_inflight_bytes <= LIMIT + CHUNK

        with side.lock:
            side.chunk_counts[ids[1]].clear()
        side.reply(ids[0], "stored", record=records[0].record_hash)
        side.reply(ids[1], "missing", missing=[[1, 2]], record=records[1].record_hash)
        side.reply(ids[2], "rejected", reason="venue_mismatch: test", record=records[2].record_hash)
        wait_until(lambda: journal.records(CAM)[0].state == "stored", 30, what="stored")
        wait_until(lambda: journal.records(CAM)[2].state == "rejected", 30, what="rejected")
        fins_before = side.fins[ids[1]]
        wait_until(lambda: side.fins[ids[1]] > fins_before, 30, what="fin after resending missing chunks")
        with side.lock:
            assert sorted(side.chunk_counts[ids[1]]) == [1, 2]  # only the missing chunks again
        assert journal.records(CAM)[1].state == "pending"
        side.reply(ids[1], "stored", record=records[1].record_hash)
        wait_until(lambda: journal.records(CAM)[1].state == "stored", 30, what="second stored")
        final = journal.records(CAM)
        assert final[2].reason == "venue_mismatch: test"
        assert all(r.path is None or r.path.exists() for r in final)  # nothing deleted
        clock = uploader.clock.current()
        assert clock.offset_ms is not None and clock.synced
    finally:
        uploader.stop()
        side.close()
        journal.close()


def test_clock_estimate_ntp_style_and_the_two_second_flag() -> None:
    from datetime import timedelta

    from edge_agent.uploader import ClockEstimator

    clock = ClockEstimator()
    assert clock.current().offset_ms is None and not clock.current().synced
    sent = datetime(2026, 11, 27, 8, 0, 0, tzinfo=timezone.utc)
    # the collector's clock is 2.5 s ahead; round trip 40 ms, reply stamped at the midpoint
    clock.add(sent, sent + timedelta(milliseconds=40), sent + timedelta(milliseconds=2520))
    estimate = clock.current()
    assert estimate.offset_ms == 2500.0 and estimate.synced is False  # over 2 s: the segment is flagged
    # a sample with a shorter round trip is more exact and wins
    clock.add(sent, sent + timedelta(milliseconds=10), sent + timedelta(milliseconds=1805))
    estimate = clock.current()
    assert estimate.offset_ms == 1800.0 and estimate.synced is True


def test_stored_counts_only_for_this_records_hash_and_rejections_are_retried(tmp_path: Path, mosquitto,
                                                                            sample_ts: Path) -> None:
    """A `stored` reply about other bytes (another record under the same file id, or naming none) never
    acknowledges a record; a rejection an operator can cure is retried after a backoff, with an alarm."""
    from datetime import timedelta

    config = load_config(write_config(tmp_path, broker_url=mosquitto.url))
    journal = Journal(config.agent.journal_path)
    sealer = Sealer(config, journal, load_private_key(config.agent.key_file))
    target = config.agent.recording_dir / CAM / "20261126T080000000000-000000.ts"
    shutil.copyfile(sample_ts, target)
    sealer.seal_file(CAM, target)
    sealer.note_outage(CAM, "camera_unreachable", "Connection refused")
    sealer.close_outages()
    segment, gap = journal.records(CAM)
    alarms: list[tuple[str, str | None]] = []
    side = FakeCollectorSide(mosquitto.port)
    uploader = Uploader(config, journal, chunk_size=CHUNK, max_inflight_bytes=LIMIT, reply_timeout=1.0,
                        on_alarm=lambda code, detail: alarms.append((code, detail)))
    uploader.connect()
    uploader.start()
    try:
        wait_until(lambda: side.fins[segment.file_id] >= 1 and side.fins[gap.file_id] >= 1, 60, what="both fins")
        side.reply(segment.file_id, "stored", record="e" * 64)   # about other bytes
        side.reply(segment.file_id, "stored")                     # about no record at all
        side.reply(gap.file_id, "rejected", reason="unknown_agent: not enrolled", record=gap.record_hash)
        wait_until(lambda: journal.records(CAM)[1].state == "rejected", 30, what="the rejection")
        wait_until(lambda: alarms and alarms[-1][0] == "records_rejected" and "unknown_agent" in (alarms[-1][1] or ""),
                   30, what="the records_rejected alarm")
        assert journal.records(CAM)[0].state == "pending"
        side.reply(segment.file_id, "stored", record=segment.record_hash)
        wait_until(lambda: journal.records(CAM)[0].state == "stored", 30, what="the real acknowledgement")

        # retried after the backoff: pretend the backoff is over, the uploader sends the init again
        with side.lock:
            inits_before = len(side.inits[gap.file_id])
        assert journal.requeue_due(datetime.now(timezone.utc) + timedelta(minutes=2)) == 1
        wait_until(lambda: len(side.inits[gap.file_id]) > inits_before, 30, what="the retried init")
        side.reply(gap.file_id, "stored", record=gap.record_hash)
        wait_until(lambda: journal.records(CAM)[1].state == "stored", 30, what="the retried record stored")
        wait_until(lambda: alarms[-1] == ("records_rejected", None), 30, what="the alarm cleared")
    finally:
        uploader.stop()
        side.close()
        journal.close()


def test_rejection_that_needs_an_operator_waits_for_exam_edge_retry(tmp_path: Path, sample_ts: Path) -> None:
    """seq_replayed is not retried by itself; `exam-edge retry` queues it again. Rejected records are never
    offered for pruning."""
    import subprocess
    import sys
    from datetime import timedelta

    config_path = write_config(tmp_path)
    config = load_config(config_path)
    journal = Journal(config.agent.journal_path)
    sealer = Sealer(config, journal, load_private_key(config.agent.key_file))
    target = config.agent.recording_dir / CAM / "20261126T080000000000-000000.ts"
    shutil.copyfile(sample_ts, target)
    record = sealer.seal_file(CAM, target)
    marked, retry_at = journal.mark_rejected(CAM, record.seq, "seq_replayed: x", record.record_hash)
    assert marked and retry_at is None
    assert journal.requeue_due(datetime.now(timezone.utc) + timedelta(days=30)) == 0
    assert journal.prunable(10) == []
    journal.close()
    result = subprocess.run([str(Path(sys.executable).parent / "exam-edge"), "--config", str(config_path), "retry"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 rejected record(s) queued for upload again")
    assert "seq_replayed" in result.stdout
    journal = Journal(config.agent.journal_path)
    assert [r.state for r in journal.records(CAM)] == ["pending"]
    journal.close()
