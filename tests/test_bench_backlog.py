"""bench/backlog.py reports best of several for both sides, with every round and the spread (no timing
thresholds: made-up figures)."""

from __future__ import annotations

import pytest

from bench.backlog import BacklogResult, Drain, summary


def test_summary_is_best_of_both_sides_with_the_baseline_spread() -> None:
    result = BacklogResult(cameras=4, outage_seconds=600,
                           drains=(Drain(600, 43, 519_100_000, 2.2, 6.3, 54.0),
                                   Drain(600, 44, 530_000_000, 1.1, 10.0, 60.0)),
                           baselines_mb_per_s=(300.0, 319.0, 250.0))
    assert result.baseline_mb_per_s == 319.0
    assert result.mb_per_s == pytest.approx(519.1 / 6.3)
    assert result.ratio_to_baseline == pytest.approx(519.1 / 6.3 / 319.0)
    assert result.peak_rss_mib == 60.0   # memory: the worst round
    text = "\n".join(summary(result))
    assert "raw MQTT baseline, same broker, same run: 300.0, 319.0, 250.0 MB/s (best 319.0; spread 250.0-319.0" in text
    assert "drain 82.4, 53.0 MB/s (best 82.4; spread 53.0-82.4" in text
    assert "best of 2 drain(s) and 3 baseline runs" in text
