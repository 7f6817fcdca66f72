"""Crash safety at the edge (issue 3): `exam-edge run` SIGKILLed twice in a row, the second time before the
restarted run sealed anything, then restarted again. seq stays contiguous, nothing recorded is lost, and
every stretch the agent was down is stated by an agent_stopped gap record (the first one used to be lost
with the killed process's memory)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from exam_contract.canonical import parse_time
from tests.edge.conftest import Cam, write_config
from tests.support.pipeline import BIN, read_journal, wait_until
from tests.integration.test_store_forward import disable_health
from tests.support.services import lavfi_source

pytestmark = [pytest.mark.ffmpeg, pytest.mark.mosquitto]
CAMERA = "crash-t111"


def _records(data: Path) -> list[tuple]:
    return read_journal(data / "journal.sqlite",
                        "select seq, kind, manifest, path from records where camera = ? order by seq", (CAMERA,))


def test_sigkill_twice_then_restart_states_every_downtime(tmp_path: Path, mosquitto) -> None:
    config = write_config(tmp_path, broker_url=mosquitto.url, segment_seconds=10,
                          cameras=(Cam(id=CAMERA, source=lavfi_source(rate=10)),))
    disable_health(config)
    data = tmp_path / "data"
    log = open(tmp_path / "agent.log", "ab")

    def start() -> subprocess.Popen:
        # --new-chains: no collector runs here, and these cameras have never uploaded anywhere
        return subprocess.Popen([str(BIN / "exam-edge"), "--config", str(config), "run", "--new-chains"], stdout=log,
                                stderr=subprocess.STDOUT)

    def sealed() -> int:
        return len(_records(data)) if (data / "journal.sqlite").exists() else 0

    agent = start()
    try:
        wait_until(lambda: sealed() >= 1, 60, what="a first sealed segment")
        time.sleep(3)  # mid-segment
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        agent = start()
        wait_until(lambda: (tmp_path / "agent.log").read_text().count("running with") >= 2, 60,
                   what="the restarted agent")
        time.sleep(4)  # its new run records, but its first segment is not finished yet
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        count = sealed()
        agent = start()
        wait_until(lambda: sealed() >= count + 2, 90, what="records after the second restart")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(120) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    rows = _records(data)
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    manifests = [json.loads(r[2]) for r in rows]
    for previous, current in zip(manifests, manifests[1:]):
        hole = (parse_time(current["start"]) - parse_time(previous["end"])).total_seconds()
        assert abs(hole) <= 2.0, f"{hole:.3f} s between seq {previous['seq']} and {current['seq']} not stated"
    gaps = [m for m in manifests if m["kind"] == "gap"]
    assert len(gaps) >= 2 and all(g["cause"] == "agent_stopped" for g in gaps)
    for seq, kind, _, path in rows:
        if kind == "segment":
            assert Path(path).exists()
