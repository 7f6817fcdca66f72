"""`exam-collector summary --venue V --camera C --since DATE` (issue 14): the listing and `--verify` cover only that
subset, so a technician's first check does not re-hash the whole archive."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from collector.admin import enroll
from collector.cli import main
from collector.config import load_config
from collector.db import make_engine, session_factory
from collector.ingest import Ingest

from .conftest import AGENT, INSTITUTION, TEST_LIMITS, VENUE, Harness, SigningAgent, payload_bytes

OTHER_VENUE = "JL2201001-02"
OLD = datetime(2026, 11, 25, 1, 0, tzinfo=timezone.utc)
NEW = datetime(2026, 11, 30, 1, 0, tzinfo=timezone.utc)   # 09:00 on 30 Nov in Asia/Shanghai


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def archive(tmp_path: Path, capsys, database_url: str) -> tuple[Path, Path]:
    """Venue 1: camera t101-front seq 1 on 25 Nov (its file then damaged) and seq 2 on 30 Nov, camera t101-back
    seq 1 on 30 Nov; venue 2: camera t101-front seq 1 on 30 Nov. Returns the config and the damaged file."""
    config = tmp_path / "collector.toml"
    assert run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "data"),
               "--database-url", database_url)[0] == 0
    assert run(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    cfg = load_config(config)
    engine = make_engine(cfg.database_url)
    first, second = SigningAgent(), SigningAgent(agent="jl2201001-02-a")
    enroll(session_factory(engine), AGENT, VENUE, first.pubkey, INSTITUTION)
    enroll(session_factory(engine), second.agent, OTHER_VENUE, second.pubkey, INSTITUTION)
    ingest = Ingest(engine, cfg.storage_dir, limits=TEST_LIMITS)

    def store(agent: SigningAgent, venue: str, camera: str, seq: int, start: datetime, prev: str | None) -> str:
        data = payload_bytes(seq)
        m = agent.manifest(seq, data, prev, camera=camera, venue=venue, start=start,
                           end=start + timedelta(seconds=10))
        reply = Harness(ingest, engine, cfg.storage_dir, agent).send(m, data)
        assert reply is not None and reply.state == "stored", reply
        return m.record_hash()

    old = store(first, VENUE, "t101-front", 1, OLD, None)
    store(first, VENUE, "t101-front", 2, NEW, old)
    store(first, VENUE, "t101-back", 1, NEW, None)
    store(second, OTHER_VENUE, "t101-front", 1, NEW, None)
    engine.dispose()
    [damaged] = [p for p in cfg.storage_dir.rglob("*.ts") if "2026/11/25" in p.as_posix()]
    raw = bytearray(damaged.read_bytes())
    raw[10] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    return config, damaged


def cameras(capsys, config: Path, *options: str) -> list[tuple[str, str, int, int]]:
    code, out, err = run(capsys, "--config", str(config), "summary", "--json", *options)
    assert code == 0, err
    return [(c["venue"], c["camera"], c["segments"], c["chain_holes"]) for c in json.loads(out)["cameras"]]


def test_filters_select_venue_camera_and_time(archive: tuple[Path, Path], capsys) -> None:
    config, _ = archive
    assert cameras(capsys, config) == [(VENUE, "t101-back", 1, 0), (VENUE, "t101-front", 2, 0),
                                       (OTHER_VENUE, "t101-front", 1, 0)]
    assert cameras(capsys, config, "--venue", VENUE) == [(VENUE, "t101-back", 1, 0), (VENUE, "t101-front", 2, 0)]
    assert cameras(capsys, config, "--camera", "t101-front") == [(VENUE, "t101-front", 2, 0),
                                                                 (OTHER_VENUE, "t101-front", 1, 0)]
    assert cameras(capsys, config, "--venue", VENUE, "--camera", "t101-front") == [(VENUE, "t101-front", 2, 0)]
    # since 30 Nov (Asia/Shanghai): seq 1 of 25 Nov is left out and is no chain hole of the subset
    assert cameras(capsys, config, "--venue", VENUE, "--since", "2026-11-30") == [(VENUE, "t101-back", 1, 0),
                                                                                    (VENUE, "t101-front", 1, 0)]
    # 09:00:05 Shanghai is 01:00:05 UTC: the 30 Nov records end at 01:00:10 UTC and stay; 09:00:11 leaves none
    assert len(cameras(capsys, config, "--since", "2026-11-30T09:00:05")) == 3
    assert cameras(capsys, config, "--since", "2026-11-30T01:00:11Z") == []


def test_verify_rehashes_only_the_subset(archive: tuple[Path, Path], capsys) -> None:
    config, damaged = archive
    base = ["--config", str(config), "summary", "--verify", "--lang", "en"]
    code, out, err = run(capsys, *base, "--venue", VENUE, "--since", "2026-11-30")
    assert (code, err) == (0, "")
    assert out.splitlines()[-1] == "all hashes and signatures verified"
    code, out, err = run(capsys, *base, "--venue", OTHER_VENUE)
    assert (code, out.splitlines()[-1]) == (0, "all hashes and signatures verified")

    code, out, err = run(capsys, *base, "--venue", VENUE, "--camera", "t101-front")
    assert code == 4
    assert out.splitlines()[-2:] == [
        "1 integrity problem(s) found",
        f"  venue {VENUE} camera t101-front seq 1: file {damaged.relative_to(load_config(config).storage_dir)} "
        f"hashes to {hashlib.sha256(damaged.read_bytes()).hexdigest()}, manifest says "
        f"{hashlib.sha256(payload_bytes(1)).hexdigest()}"]
    assert run(capsys, *base)[0] == 4


def test_a_since_that_is_no_time_is_one_line_exit_1(archive: tuple[Path, Path], capsys) -> None:
    config, _ = archive
    assert run(capsys, "--config", str(config), "summary", "--since", "yesterday") == (
        1, "", "exam-collector: error: --since 'yesterday' is not an ISO 8601 time: write e.g. 2026-11-20T09:00 "
               "(Asia/Shanghai) or 2026-11-20T01:00:00Z\n")
