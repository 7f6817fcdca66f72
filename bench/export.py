"""Evidence export throughput against `cp` of the same files, measured in the same run.

Builds a throwaway collector (SQLite, one enrolled agent, N segment files ingested through
collector.ingest.Ingest with signed manifests, one batch covering them), warms the page cache, then
alternates `export_batch` (copy with SHA-256 of every byte, keys, coverage, package.json signed, audit entry
and checkpoint) and `cp -r` of the same stored files into a fresh folder, `--rounds` times. Prints best-of
export MB/s ÷ best-of cp MB/s (target >= 0.8) on random bytes, with `--check-hashes` (SHA-256 of every
byte while copying) shown too. `--viewing` adds real 720p H.264 footage exported with its viewing MP4s
(a second, stream-copied file per camera), against `cp -r` plus a bare `ffmpeg -c copy` of the same
segments into one MP4 run one after the other: the same work done by hand. Run from the repo root:

    .venv/bin/python -m bench.export --files 16 --mib 32 --rounds 3 [--viewing]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from collector.admin import enroll
from collector.batches import import_batches
from collector.db import make_engine, session_factory, upgrade
from collector.export import ExportSettings, export_batch
from collector.footage_store import FilesystemStore
from collector.ingest import Ingest
from exam_contract.signing import generate_private_key, load_private_key, public_key_b64
from tests.support.footage import BASE, SITE_A, Camera, Demo, make_segments

MB = 1_000_000


def build(root: Path, files: int, mib: int, real: list[Path] | None = None) -> tuple[Demo, int]:
    engine = make_engine(f"sqlite:///{root / 'collector.db'}")
    upgrade(engine)
    sessions = session_factory(engine)
    key_file = root / "collector.key"
    generate_private_key(key_file)
    demo = Demo(root, f"sqlite:///{root / 'collector.db'}", engine, sessions, root / "storage", key_file,
                Ingest(engine, root / "storage"))
    camera = Camera(SITE_A, Ed25519PrivateKey.generate())
    enroll(sessions, SITE_A.agent, SITE_A.venue, public_key_b64(camera.key), SITE_A.institution)
    total = 0
    seconds = 60
    count = len(real) if real else files
    for i in range(count):
        data = real[i].read_bytes() if real else os.urandom(mib << 20)
        step = 2 if real else seconds
        demo.send(camera, camera.manifest("segment", BASE + timedelta(seconds=i * step), step, data), data)
        total += len(data)
    end = BASE + timedelta(seconds=count * (2 if real else seconds))
    csv = ("batch_id,institution,venue,occupation,level,part,room,start,end\n"
           f"BENCH,{SITE_A.institution},{SITE_A.venue},电工,四级,theory,{SITE_A.room},"
           f"{BASE.isoformat()},{end.isoformat()}\n")
    with sessions.begin() as session:
        import_batches(session, csv.encode(), source="bench.csv", actor="bench")
    return demo, total


def drop_outputs(root: Path) -> None:
    for path in root.glob("out-*"):
        shutil.rmtree(path)


def timed_export(demo: Demo, out: Path, viewing: bool, check_hashes: bool = False) -> float:
    key = load_private_key(demo.key_file)
    started = time.perf_counter()
    result = export_batch(demo.sessions, store=FilesystemStore(demo.storage), key=key, batch_id="BENCH", out=out,
                          actor="bench", reason="benchmark", settings=ExportSettings(viewing=viewing, check_hashes=check_hashes))
    elapsed = time.perf_counter() - started
    if result.source_problems:
        raise SystemExit(f"bench: export found problems: {result.source_problems[:3]}")
    return elapsed


def timed_cp(demo: Demo, out: Path) -> float:
    source = demo.storage / SITE_A.institution
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(out)], check=True)
    return time.perf_counter() - started


def timed_bare_remux(demo: Demo, out: Path) -> float:
    """`ffmpeg -c copy` of the same stored segments into one MP4, as one byte stream (concat protocol): the
    least a hand-made viewing copy costs."""
    sources = sorted(p for p in (demo.storage / SITE_A.institution).rglob("*.ts"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i",
                    "concat:" + "|".join(str(p) for p in sources), "-map", "0", "-c", "copy", str(out / "bare.mp4")],
                   check=True)
    return time.perf_counter() - started


def compare(demo: Demo, total: int, rounds: int, viewing: bool, label: str, check_hashes: bool = False) -> float:
    """Best-of export MB/s ÷ best-of baseline MB/s: `cp -r`, plus a bare `ffmpeg -c copy` when the export
    makes viewing MP4s (the same work done by hand)."""
    for path in (demo.storage / SITE_A.institution).rglob("*"):   # warm the page cache for both
        if path.is_file():
            path.read_bytes()
    exports, baselines = [], []
    for i in range(rounds):
        exports.append(total / timed_export(demo, demo.root / f"out-export-{i}", viewing, check_hashes) / MB)
        seconds = timed_cp(demo, demo.root / f"out-cp-{i}")
        if viewing:
            seconds += timed_bare_remux(demo, demo.root / f"out-remux-{i}")
        baselines.append(total / seconds / MB)
        drop_outputs(demo.root)
    ratio = max(exports) / max(baselines)
    baseline = "cp + bare ffmpeg -c copy" if viewing else "cp"
    print(f"{label}: {total / MB:.0f} MB; export {min(exports):.0f}-{max(exports):.0f} MB/s (best {max(exports):.0f}), "
          f"{baseline} {min(baselines):.0f}-{max(baselines):.0f} MB/s (best {max(baselines):.0f}); "
          f"export/({baseline}) = {ratio:.2f} (target >= 0.8)", flush=True)
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--mib", type=int, default=32, help="size of each segment file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--viewing", action="store_true", help="also measure export with viewing MP4s")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        (root / "a").mkdir()
        demo, total = build(root / "a", args.files, args.mib)
        ratio = compare(demo, total, args.rounds, viewing=False, label=f"{args.files} x {args.mib} MiB segments")
        compare(demo, total, args.rounds, viewing=False, check_hashes=True,
                label=f"{args.files} x {args.mib} MiB segments, --check-hashes")
        demo.engine.dispose()
        if args.viewing:
            if shutil.which("ffmpeg") is None:
                print("bench: ffmpeg missing, --viewing skipped", file=sys.stderr)
            else:
                (root / "b").mkdir()
                real = make_segments(root / "lavfi", count=60, size="1280x720")
                demo_b, total_b = build(root / "b", 0, 0, real)
                ratio_viewing = compare(demo_b, total_b, args.rounds, viewing=True,
                                        label="60 x 2 s 720p H.264 with viewing MP4s")
                ratio = min(ratio, ratio_viewing)
                demo_b.engine.dispose()
    return 0 if ratio >= 0.8 else 3


if __name__ == "__main__":
    sys.exit(main())
