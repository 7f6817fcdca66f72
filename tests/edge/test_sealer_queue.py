"""The sealer's queue (typed commands done in order by its thread) and the recorder's camera states."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.journal import Journal
from edge_agent.recorder import CameraRecorder, RecorderState
from edge_agent.sealer import Sealer
from edge_agent.segment_files import segment_list_name
from exam_contract.manifest import Manifest
from exam_contract.signing import load_private_key
from tests.edge.conftest import write_config

CAM = "t101-front"
ANCHOR = datetime(2026, 11, 26, 8, 0, 0, 123456, tzinfo=timezone.utc)
RUN, LATER_RUN = "20261126T080000000000", "20261126T090000000000"


@pytest.mark.ffmpeg
def test_queued_commands_are_done_in_order_and_an_unknown_one_is_logged_as_a_bug(
        tmp_path: Path, sample_ts: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(write_config(tmp_path))
    journal = Journal(config.agent.journal_path)
    sealer = Sealer(config, journal, load_private_key(config.agent.key_file))
    rec_dir = config.agent.recording_dir / CAM
    for run, anchor in ((RUN, ANCHOR), (LATER_RUN, ANCHOR + timedelta(hours=1))):
        journal.set_run_anchor(CAM, run, anchor)
        (rec_dir / segment_list_name(run)).write_text(f"{run}-000000.ts,0.000000,4.000000\n")
    first, later, partial = (rec_dir / f"{run}-{index:06d}.ts" for run, index in ((RUN, 0), (LATER_RUN, 0),
                                                                                   (LATER_RUN, 1)))
    for path in (first, later, partial):
        shutil.copyfile(sample_ts, path)
    sealer.start()
    with caplog.at_level(logging.ERROR, logger="edge_agent.sealer"):
        sealer._queue.put(("segment", (CAM, first)))  # type: ignore[arg-type]  # the old, untyped form
        sealer.submit_segment(CAM, first)
        sealer.submit_outage(CAM, "camera_unreachable", "no route to host")
        sealer.submit_segment(CAM, later)
        sealer.submit_run_finished(CAM, LATER_RUN)  # seals the run's unlisted last file
        sealer.stop()
    assert f"sealer: unknown command ('segment', ('{CAM}', {first!r})) (a bug)" in caplog.text
    manifests = [Manifest.from_dict(r.manifest_raw) for r in journal.records(CAM)]
    assert [(m.kind, m.cause) for m in manifests] == [("segment", None), ("gap", "camera_unreachable"),
                                                       ("segment", None), ("segment", None)]
    assert manifests[1].start == manifests[0].end and manifests[1].end == manifests[2].start
    assert not (rec_dir / segment_list_name(LATER_RUN)).exists()
    journal.close()


def test_camera_states_are_plain_strings_in_json(tmp_path: Path) -> None:
    assert json.dumps({CAM: RecorderState.DISK_FULL}) == json.dumps({CAM: "disk_full"})
    assert [state.value for state in RecorderState] == ["starting", "recording", "restarting", "disk_full",
                                                        "stopped"]
    config = load_config(write_config(tmp_path))
    journal = Journal(config.agent.journal_path)
    recorder = CameraRecorder(config.cameras[0], 10, config.agent.recording_dir, journal,
                              Sealer(config, journal, load_private_key(config.agent.key_file)))
    assert recorder.state == "stopped"
    with pytest.raises(ValueError):
        recorder.hold("lunch_break", "a hold whose cause is no camera state")
    journal.close()
