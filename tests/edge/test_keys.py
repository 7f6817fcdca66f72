"""`exam-edge rotate-key`, and an agent that starts with a new key signing its unsent records again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from edge_agent.config import load_config
from edge_agent.spool import Journal, Sealer
from exam_contract.signing import load_private_key, public_key_b64, verify
from tests.edge.conftest import write_config

BIN = Path(sys.executable).parent
CAM = "t101-front"


def test_rotate_key_keeps_the_old_key_aside_and_prints_the_enrol_command(tmp_path: Path, sample_ts: Path) -> None:
    config_path = write_config(tmp_path)
    config = load_config(config_path)
    old = load_private_key(config.agent.key_file)
    journal = Journal(config.agent.journal_path)
    sealer = Sealer(config, journal, old)
    target = config.agent.recording_dir / CAM / "20261126T080000000000-000000.ts"
    shutil.copyfile(sample_ts, target)
    record = sealer.seal_file(CAM, target)
    journal.close()

    result = subprocess.run([str(BIN / "exam-edge"), "--config", str(config_path), "rotate-key"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    new = load_private_key(config.agent.key_file)
    assert public_key_b64(new) != public_key_b64(old)
    assert config.agent.key_file.stat().st_mode & 0o777 == 0o600
    [retired] = tmp_path.glob("agent.key.retired-*")
    assert public_key_b64(load_private_key(retired)) == public_key_b64(old)
    assert (f"exam-collector enroll --agent jl2201001-01-a --venue JL2201001-01 --institution JL2201001 "
            f"--pubkey {public_key_b64(new)} --replace") in result.stdout

    # the agent starts with the new key: its unsent record is signed again, record and chain unchanged
    from edge_agent.agent import Agent

    agent = Agent(config, new, drain_seconds=0)
    try:
        [again] = agent.journal.records(CAM)
    finally:
        agent.journal.close()
    assert again.record_hash == record.record_hash and again.manifest_json == record.manifest_json
    assert verify(new.public_key(), again.manifest_json.encode(), again.signature)
    assert not verify(old.public_key(), again.manifest_json.encode(), again.signature)
