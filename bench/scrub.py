"""Scrub throughput against `openssl dgst -sha256` over the same files, measured in the same run.

Builds a throwaway collector (SQLite, storage dir, an enrolled agent, signed manifests and rows for N files of
random bytes), then alternates `retention.scrub.run_scrub` (full sample: record checks, orphan walk, re-hash)
and `openssl dgst -sha256` over the same files, `--rounds` times, both reading from the page cache. Like is
compared with like: scrub hashing on N threads against N `openssl dgst -sha256` processes run in parallel, each
over 1/N of the files (every N-th) (N = 1: one thread against one process); the output says which. Prints every round's MB/s,
the best and the spread of each side, and best scrub MB/s / best openssl MB/s (target >= 0.8). Run from the
repo root:

    .venv/bin/python -m bench.scrub --files 16 --mib 32 [--workers 1]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from collector.db import make_engine, session_factory, upgrade
from collector.footage_store import FilesystemStore
from collector.ingest import storage_relpath
from collector.models import CHAIN_FIRST, CHAIN_LINKED, Agent, SegmentRecord
from exam_contract.manifest import Manifest, VideoInfo
from exam_contract.signing import public_key_b64, sign
from retention.scrub import run_scrub

START = datetime(2026, 11, 26, 1, 0, tzinfo=timezone.utc)


class BenchError(RuntimeError):
    """The benchmark could not run; the message says why."""


@dataclass(frozen=True)
class ScrubBench:
    files: int
    total_bytes: int
    scrub_mb_s: tuple[float, ...]
    openssl_mb_s: tuple[float, ...]
    workers: int

    @property
    def ratio(self) -> float:
        return max(self.scrub_mb_s) / max(self.openssl_mb_s)


def build_store(root: Path, files: int, size: int) -> tuple[object, Path, list[Path]]:
    storage = root / "storage"
    engine = make_engine(f"sqlite:///{root / 'collector.db'}")
    upgrade(engine)
    key = Ed25519PrivateKey.generate()
    paths: list[Path] = []
    with session_factory(engine).begin() as s:
        s.add(Agent(id="bench-agent", venue="V-BENCH", institution="I-BENCH", public_key=public_key_b64(key),
                    enrolled_at=START))
        s.flush()
        prev = None
        for seq in range(1, files + 1):
            data = os.urandom(size)
            start = START + timedelta(seconds=60 * (seq - 1))
            m = Manifest(kind="segment", agent="bench-agent", institution="I-BENCH", venue="V-BENCH", room="R1",
                         room_kind="theory", camera="cam1", seq=seq, start=start, end=start + timedelta(seconds=60),
                         duration=60.0, size=size, sha256=hashlib.sha256(data).hexdigest(), prev=prev,
                         video=VideoInfo("h264", 1920, 1080, 25.0))
            rel = storage_relpath(m)
            path = storage / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            paths.append(path)
            canonical = m.canonical()
            s.add(SegmentRecord(agent_id="bench-agent", institution="I-BENCH", venue="V-BENCH", room="R1",
                                room_kind="theory", camera="cam1", seq=seq, file_id=m.file_id, kind="segment",
                                start_at=m.start, end_at=m.end, duration=60.0, size=size, sha256=m.sha256,
                                record_hash=m.record_hash(), prev_hash=prev, manifest=canonical.decode("utf-8"),
                                signature=sign(key, canonical), storage_path=rel.as_posix(),
                                chain_status=CHAIN_FIRST if seq == 1 else CHAIN_LINKED, stored_at=START))
            prev = m.record_hash()
    return engine, storage, paths


def openssl_mb_s(paths: list[Path], total: int, processes: int = 1) -> float:
    """MB/s of `processes` parallel `openssl dgst -sha256` runs, each over every `processes`-th file; the clock
    runs from the first start to the last exit."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BenchError("openssl is not installed: apt-get install openssl")
    shares = [paths[i::processes] for i in range(max(1, processes)) if paths[i::processes]]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([openssl, "dgst", "-sha256", *map(str, share)], stdout=subprocess.DEVNULL)
             for share in shares]
    codes = [proc.wait() for proc in procs]
    seconds = time.perf_counter() - t0
    if any(codes):
        raise BenchError(f"openssl dgst exited {codes}")
    return total / 1e6 / seconds


def run(files: int = 16, mib: int = 32, rounds: int = 3, workers: int | None = None) -> ScrubBench:
    size = mib * 1024 * 1024
    workers = workers or min(2, os.cpu_count() or 1)   # scrub's own default, made explicit for both sides
    with tempfile.TemporaryDirectory(prefix="bench-scrub-") as tmp:
        engine, storage, paths = build_store(Path(tmp), files, size)
        total = files * size
        sessions = session_factory(engine)
        for p in paths:  # warm the page cache for both contenders
            with open(p, "rb") as handle:
                while handle.read(1 << 22):
                    pass
        scrub, ossl = [], []
        try:
            for _ in range(rounds):
                result = run_scrub(sessions, FilesystemStore(storage), sample=1.0, actor="bench", workers=workers)
                if result.problems or result.bytes_checked != total:
                    raise BenchError(f"scrub found problems in the bench store: {result.problems[:3]}")
                scrub.append(result.mb_per_s)
                ossl.append(openssl_mb_s(paths, total, processes=workers))
        finally:
            engine.dispose()
    return ScrubBench(files, total, tuple(scrub), tuple(ossl), workers)


def _figures(values: tuple[float, ...]) -> str:
    """Every round, the best, and the spread (slowest round below the best)."""
    best, worst = max(values), min(values)
    spread = f"; spread {worst:.0f}-{best:.0f}, worst {100 * (1 - worst / best):.0f} % below best" if len(values) > 1 else ""
    return ", ".join(f"{v:.0f}" for v in values) + f" (best {best:.0f}{spread})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--mib", type=int, default=32, help="MiB per file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="scrub hashing threads, and as many parallel "
                        "openssl processes (default: scrub's own, min(2, cores))")
    args = parser.parse_args(argv)
    try:
        r = run(args.files, args.mib, args.rounds, args.workers)
    except BenchError as exc:
        print(f"bench.scrub: error: {exc}", file=sys.stderr)
        return 1
    like = ("one scrub hashing thread vs one openssl dgst -sha256 process" if r.workers == 1 else
            f"scrub on {r.workers} hashing threads vs {r.workers} openssl dgst -sha256 processes in parallel "
            f"(each hashing 1/{r.workers} of the files)")
    print(f"files: {r.files} x {args.mib} MiB = {r.total_bytes / 1e6:.0f} MB, page cache; {like}")
    print(f"scrub MB/s ({r.workers} thread{'s' if r.workers > 1 else ''}):   " + _figures(r.scrub_mb_s))
    print(f"openssl MB/s ({r.workers} process{'es' if r.workers > 1 else ''}): " + _figures(r.openssl_mb_s))
    print(f"scrub / openssl dgst -sha256: {r.ratio:.2f} = {max(r.scrub_mb_s):.0f} / {max(r.openssl_mb_s):.0f} MB/s, "
          f"same parallelism ({r.workers}), best of {len(r.scrub_mb_s)} rounds each (target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
