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

    def reply(self, file_id: str, state: str, missing=None, reason=None) -> None:
        body = Reply(file_id=file_id, state=state, collector_time=datetime.now(timezone.utc),
                     missing=missing or [], reason=reason).encode()
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
        # a PUBACK proves nothing: without a reply everything stays pending
        assert [r.state for r in journal.records(CAM)] == ["pending"] * 3
        assert uploader.peak_inflight_bytes <= LIMIT + CHUNK

        with side.lock:
            side.chunk_counts[ids[1]].clear()
        side.reply(ids[0], "stored")
        side.reply(ids[1], "missing", missing=[[1, 2]])
        side.reply(ids[2], "rejected", reason="venue_mismatch: test")
        wait_until(lambda: journal.records(CAM)[0].state == "stored", 30, what="stored")
        wait_until(lambda: journal.records(CAM)[2].state == "rejected", 30, what="rejected")
        fins_before = side.fins[ids[1]]
        wait_until(lambda: side.fins[ids[1]] > fins_before, 30, what="fin after resending missing chunks")
        with side.lock:
            assert sorted(side.chunk_counts[ids[1]]) == [1, 2]  # only the missing chunks again
        assert journal.records(CAM)[1].state == "pending"
        side.reply(ids[1], "stored")
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
