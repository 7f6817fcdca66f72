"""Sealing and the journal: exact times from the run anchor, corrupt files, crash recovery, chain rules."""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.spool import Journal, JournalError, Sealer, segment_list_name
from exam_contract.manifest import Manifest, segment_file_name
from exam_contract.signing import load_private_key
from tests.edge.conftest import write_config

pytestmark = pytest.mark.ffmpeg
CAM = "t101-front"
ANCHOR = datetime(2026, 11, 26, 8, 0, 0, 123456, tzinfo=timezone.utc)
RUN = "20261126T080000000000"


@pytest.fixture
def stack(tmp_path: Path):
    config = load_config(write_config(tmp_path))
    journal = Journal(config.agent.journal_path)
    sealer = Sealer(config, journal, load_private_key(config.agent.key_file))
    yield config, journal, sealer
    journal.close()


def place(config, sample: Path, index: int, run: str = RUN) -> Path:
    target = config.agent.recording_dir / CAM / f"{run}-{index:06d}.ts"
    shutil.copyfile(sample, target)
    return target


def test_times_come_from_anchor_and_segment_list(stack, sample_ts: Path) -> None:
    config, journal, sealer = stack
    journal.set_run_anchor(CAM, RUN, ANCHOR)
    (config.agent.recording_dir / CAM / segment_list_name(RUN)).write_text(
        f"{RUN}-000000.ts,0.000000,4.000000\n{RUN}-000001.ts,4.000000,8.000000\n")
    first = sealer.seal_file(CAM, place(config, sample_ts, 0))
    second = sealer.seal_file(CAM, place(config, sample_ts, 1))
    third = sealer.seal_file(CAM, place(config, sample_ts, 2))  # not listed: a partial last segment
    m1, m2, m3 = (Manifest.from_dict(r.manifest_raw) for r in (first, second, third))
    assert m1.start == datetime(2026, 11, 26, 8, 0, 0, 123000, tzinfo=timezone.utc)
    assert m1.end == m2.start == m1.start + timedelta(seconds=4)
    assert m3.start == m2.end and m3.end == m3.start + timedelta(seconds=m3.duration)
    assert first.path.name == segment_file_name(CAM, m1.start)
    assert [m.seq for m in (m1, m2, m3)] == [1, 2, 3]
    assert m2.prev == first.record_hash and m3.prev == second.record_hash
    assert sealer.seal_file(CAM, first.path) is None  # already journaled: never sealed twice



def test_ffprobe_reads_the_first_listed_segment_of_a_run_and_every_unlisted_one(stack, sample_ts: Path,
                                                                                 monkeypatch) -> None:
    """Listed segments after the first take duration from ffmpeg's list and the stream from the run's probe;
    a listed file that is not MPEG-TS, and the unlisted partial, still go through ffprobe."""
    import edge_agent.sealer as spool  # the module the Sealer looks probe_segment up in

    config, journal, sealer = stack
    probed: list[str] = []
    real_probe = spool.probe_segment

    def counting_probe(path: Path, timeout: float = 60):  # the real ffprobe, counted
        probed.append(path.name)
        return real_probe(path, timeout)

    monkeypatch.setattr(spool, "probe_segment", counting_probe)
    journal.set_run_anchor(CAM, RUN, ANCHOR)
    names = [f"{RUN}-{i:06d}.ts" for i in range(4)]
    (config.agent.recording_dir / CAM / segment_list_name(RUN)).write_text(
        "".join(f"{n},{4 * i:.6f},{4 * i + 4:.6f}\n" for i, n in enumerate(names[:3])))
    first = sealer.seal_file(CAM, place(config, sample_ts, 0))
    second = sealer.seal_file(CAM, place(config, sample_ts, 1))
    broken = place(config, sample_ts, 2)
    broken.write_bytes(b"not a transport stream" * 100)  # listed, but damaged after ffmpeg closed it
    gap = sealer.seal_file(CAM, broken)
    partial = sealer.seal_file(CAM, place(config, sample_ts, 3))
    assert probed == [names[0], names[2], names[3]]
    m1, m2, m3, m4 = (Manifest.from_dict(r.manifest_raw) for r in (first, second, gap, partial))
    assert m2.video == m1.video and m2.duration == 4.0 and m2.end - m2.start == timedelta(seconds=4)
    assert m3.kind == "gap" and m3.cause == "corrupt_segment" and names[2] in (m3.detail or "")
    real = real_probe(partial.path)
    assert m4.kind == "segment" and m4.duration == real.duration and m4.video == real.video
    # a new run of the camera is probed again
    other_run = "20261126T090000000000"
    journal.set_run_anchor(CAM, other_run, ANCHOR + timedelta(hours=1))
    (config.agent.recording_dir / CAM / segment_list_name(other_run)).write_text(
        f"{other_run}-000000.ts,0.000000,4.000000\n")
    sealer.seal_file(CAM, place(config, sample_ts, 0, run=other_run))
    assert probed[-1] == f"{other_run}-000000.ts"



def test_no_ffprobe_when_ffmpeg_reported_the_stream(stack, sample_ts: Path, monkeypatch) -> None:
    """With the live recorder's report of the run's stream, a listed segment is sealed without ffprobe."""
    import edge_agent.sealer as spool  # the module the Sealer looks probe_segment up in
    from edge_agent.spool import JournalRuns, probe_segment

    config, journal, sealer = stack
    reported = probe_segment(sample_ts).video

    class ReportingRuns(JournalRuns):
        def video(self, camera: str, run_id: str):  # what Recorders answers from ffmpeg's stream line
            return reported if (camera, run_id) == (CAM, RUN) else None

    sealer.runs = ReportingRuns(journal)
    probed: list[str] = []
    real_probe = spool.probe_segment
    monkeypatch.setattr(spool, "probe_segment", lambda path, timeout=60: probed.append(path.name) or real_probe(path))
    journal.set_run_anchor(CAM, RUN, ANCHOR)
    (config.agent.recording_dir / CAM / segment_list_name(RUN)).write_text(f"{RUN}-000000.ts,0.000000,4.000000\n")
    record = sealer.seal_file(CAM, place(config, sample_ts, 0))
    partial = sealer.seal_file(CAM, place(config, sample_ts, 1))  # unlisted: still read by ffprobe
    assert probed == [f"{RUN}-000001.ts"]
    m = Manifest.from_dict(record.manifest_raw)
    assert m.video == reported and m.duration == 4.0 and Manifest.from_dict(partial.manifest_raw).kind == "segment"


def test_unreadable_segment_becomes_gap_and_is_kept(stack, sample_ts: Path) -> None:
    config, journal, sealer = stack
    journal.set_run_anchor(CAM, RUN, ANCHOR)
    (config.agent.recording_dir / CAM / segment_list_name(RUN)).write_text(
        f"{RUN}-000000.ts,0.000000,4.000000\n{RUN}-000001.ts,4.000000,8.000000\n")
    sealer.seal_file(CAM, place(config, sample_ts, 0))
    bad = config.agent.recording_dir / CAM / f"{RUN}-000001.ts"
    bad.write_bytes(b"this is not video" * 100)
    record = sealer.seal_file(CAM, bad)
    gap = Manifest.from_dict(record.manifest_raw)
    assert gap.kind == "gap" and gap.cause == "corrupt_segment" and gap.seq == 2
    assert gap.start == ANCHOR.replace(microsecond=123000) + timedelta(seconds=4)
    assert (config.agent.corrupt_dir / CAM / bad.name).read_bytes() == b"this is not video" * 100


def test_journal_refuses_reused_or_skipped_seq(stack, sample_ts: Path) -> None:
    config, journal, sealer = stack
    record = sealer.seal_file(CAM, place(config, sample_ts, 0))
    manifest = Manifest.from_dict(record.manifest_raw)
    with pytest.raises(JournalError):
        journal.append(manifest, record.signature, None, None)  # seq 1 again
    with pytest.raises(JournalError):
        journal.append(replace(manifest, seq=3, prev=record.record_hash), record.signature, None, None)
    assert [r.seq for r in journal.records(CAM)] == [1]


def test_restart_recovers_interrupted_move_and_leftovers(tmp_path: Path, sample_ts: Path) -> None:
    config = load_config(write_config(tmp_path))
    key = load_private_key(config.agent.key_file)
    journal = Journal(config.agent.journal_path)
    sealer = Sealer(config, journal, key)
    sealed = sealer.seal_file(CAM, place(config, sample_ts, 0))
    # as if the agent died after the journal commit but before the rename
    src = config.agent.recording_dir / CAM / f"{RUN}-000000.ts"
    sealed.path.rename(src)
    journal._db.execute("update records set moved = 0 where id = ?", (sealed.id,))
    leftover = place(config, sample_ts, 1)            # a finished file nobody sealed
    still_open = place(config, sample_ts, 0, run="20261126T090000000000")
    journal.close()

    journal = Journal(config.agent.journal_path)
    with open(still_open, "ab"):                      # a writer still holds it: not sealed
        Sealer(config, journal, key).recover()
    records = journal.records(CAM)
    assert [r.seq for r in records] == [1, 2]
    assert sealed.path.exists() and not src.exists()
    assert not leftover.exists() and records[1].path.exists()
    assert Manifest.from_dict(records[1].manifest_raw).prev == records[0].record_hash
    assert still_open.exists()
    journal.close()


def test_records_not_yet_stored_are_signed_again_with_a_new_key(stack, sample_ts: Path) -> None:
    """After a key change the collector verifies with the new key: pending and rejected records get a new
    signature; their manifest, record hash and chain stay as they were, and stored ones are left alone."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from exam_contract.signing import verify

    config, journal, sealer = stack
    records = [sealer.seal_file(CAM, place(config, sample_ts, index)) for index in range(3)]
    assert journal.mark_stored(CAM, records[0].seq, records[0].record_hash)
    journal.mark_rejected(CAM, records[2].seq, "bad_signature: x", records[2].record_hash, retryable=True)
    new_key = Ed25519PrivateKey.generate()
    assert journal.resign(new_key) == 2
    assert journal.resign(new_key) == 0  # already done
    after = journal.records(CAM)
    assert [r.record_hash for r in after] == [r.record_hash for r in records]
    assert [r.manifest_json for r in after] == [r.manifest_json for r in records]
    assert after[0].signature == records[0].signature  # stored: kept as the collector has it
    for record in after[1:]:
        assert verify(new_key.public_key(), record.manifest_json.encode(), record.signature)


def test_adopted_chain_head_continues_the_collectors_chain(stack, sample_ts: Path) -> None:
    config, journal, sealer = stack
    head_end = ANCHOR - timedelta(hours=1)
    assert journal.adopt_head(CAM, 41, "c" * 64, head_end)
    assert not journal.adopt_head(CAM, 50, "d" * 64, head_end)  # only for a camera this journal never had
    record = sealer.seal_file(CAM, place(config, sample_ts, 0))
    assert record.seq == 42 and record.manifest_raw["prev"] == "c" * 64
    assert journal.chain_known(CAM) and not journal.chain_known("other-cam")
    journal.start_chain("other-cam")
    assert journal.chain_known("other-cam") and journal.camera_state("other-cam").last_seq == 0
