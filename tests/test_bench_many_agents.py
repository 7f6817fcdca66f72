"""bench/many_agents.py runs end to end on a tiny province (5 agents x 2 files x 64 KiB, 1 round): the real
`exam-collector serve` stores every file (reply and database row), the baseline carries the same messages, and the
output has its shape. No timing thresholds."""

from __future__ import annotations

import os
import re

import pytest

from bench.many_agents import BROKER_LIMITS, broker_limits, main
from tests.support.services import mosquitto_binary


def test_broker_limits_are_the_production_ones_raised_to_twice_the_burst() -> None:
    assert broker_limits(5, 2, 64 * 1024) == BROKER_LIMITS
    # 150 agents x 2 files x 1 MiB (4 chunks + init + fin) at once
    assert broker_limits(150, 2, 2**20) == {"max_queued_messages": 4000, "max_queued_bytes": 2 * 300 * 2**20,
                                            "max_inflight_messages": 64}


@pytest.mark.mosquitto
def test_many_agents_bench_stores_every_file(capsys: pytest.CaptureFixture[str]) -> None:
    if mosquitto_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mosquitto is required in CI (CI=true) but unavailable", pytrace=False)
        pytest.skip("mosquitto unavailable")
    code = main(["--agents", "5", "--files-per-agent", "2", "--file-kib", "64", "--rounds", "1", "--timeout", "60"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("many agents: 5 agents (5 institutions, a venue each) x 2 segments of 64 KiB = 10 files")
    assert re.fullmatch(r"round 1: ingest [\d.]+ files/s, \d+ MB/s \([\d.]+ s, 10 of 10 stored\); "
                        r"baseline [\d.]+ files/s, \d+ MB/s \([\d.]+ s\)", lines[2]), lines[2]
    assert re.match(r"ingest \(sqlite, 2 workers, 2 finishers\): 10 x 64 KiB segments from 5 agents, every one "
                    r"stored \(reply and database row\) in every round: best [\d.]+ files/s", lines[3]), lines[3]
    assert re.match(r"mqtt baseline, .*: best [\d.]+ files/s \(\d+ MB/s\), spread \d+-\d+ files/s", lines[4]), lines[4]
    assert re.fullmatch(r"ingest / baseline = [\d.]+ \(best of 1 each\)", lines[5]), lines[5]
    assert re.match(r"against the issue's reference \(sqlite 43 files/s\): [\d.]+x; target >= 3x = 129 files/s: "
                    r"(met|NOT met)", lines[6]), lines[6]
