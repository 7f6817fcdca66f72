"""bench/scrub.py compares like with like: N scrub hashing threads against N parallel openssl processes, and
says so (no timing assertions)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bench import scrub


@pytest.fixture
def openssl() -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl unavailable")


def test_parallel_openssl_hashes_every_file_once(tmp_path: Path, monkeypatch, openssl) -> None:
    paths = []
    for i in range(5):
        path = tmp_path / f"f{i}"
        path.write_bytes(bytes([i]) * 1000)
        paths.append(path)
    runs: list[list[str]] = []
    real = subprocess.Popen

    def recording(cmd, **kwargs):
        runs.append(list(cmd))
        return real(cmd, **kwargs)

    monkeypatch.setattr(scrub.subprocess, "Popen", recording)
    assert scrub.openssl_mb_s(paths, 5000, processes=2) > 0
    assert len(runs) == 2   # two processes at once, every file in exactly one of them
    assert sorted(arg for cmd in runs for arg in cmd[3:]) == sorted(map(str, paths))
    assert all(cmd[1:3] == ["dgst", "-sha256"] for cmd in runs)


@pytest.mark.parametrize("workers, says", [(1, "one scrub hashing thread vs one openssl dgst -sha256 process"),
                                           (2, "scrub on 2 hashing threads vs 2 openssl dgst -sha256 processes")])
def test_output_names_the_parallelism_and_spread(capsys, openssl, workers: int, says: str) -> None:
    assert scrub.main(["--files", "2", "--mib", "1", "--rounds", "2", "--workers", str(workers)]) == 0
    out = capsys.readouterr().out
    assert says in out
    assert f"same parallelism ({workers}), best of 2 rounds each" in out
    assert out.count("spread ") == 2   # both sides' spread across rounds
