"""bench/scrub.py runs end to end on a tiny store (no timing assertions: numbers go to docs/benchmarks.md)."""

from __future__ import annotations

import shutil

import pytest

from bench.scrub import main, run


def test_bench_scrub_small(capsys) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl unavailable")
    result = run(files=2, mib=1, rounds=1)
    assert result.files == 2 and result.total_bytes == 2 * 1024 * 1024
    assert len(result.scrub_mb_s) == 1 and len(result.openssl_mb_s) == 1 and result.ratio > 0
    assert main(["--files", "2", "--mib", "1", "--rounds", "1"]) == 0
    assert "scrub / openssl dgst -sha256:" in capsys.readouterr().out
