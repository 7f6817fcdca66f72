"""Evidence packages: export real ffmpeg footage, verify with `exam-collector verify-package` and with the
package's own verify.py (same verdict), tamper with it, and verify in a fresh venv holding only cryptography."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, update

from collector.admin import agent_keys, enroll
from collector.audit import ACTION_FOOTAGE_EXPORT
from collector.batches import import_batches
from collector.db import make_engine, session_factory, upgrade
from collector.evidence_verify import NOT_OK, OK, OK_WITH_GAPS, verify_package
from collector.export import ExportError, ExportSettings, export_batch
from collector.footage_store import FilesystemStore
from collector.ingest import Ingest
from collector.models import AuditCheckpoint, AuditEntry, SegmentRecord
from exam_contract.canonical import format_time
from exam_contract.signing import generate_private_key, key_fingerprint, load_private_key, public_key_b64, sign
from tests.support.footage import BASE, SEGMENT_SECONDS, SITE_A, Camera, Demo, build_demo, make_segments
from tests.support.stored import StoredFootage

pytestmark = pytest.mark.ffmpeg
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def segment_files(tmp_path_factory: pytest.TempPathFactory, ffmpeg_available: None) -> list[Path]:
    return make_segments(tmp_path_factory.mktemp("lavfi"))


@pytest.fixture
def demo(tmp_path: Path, segment_files: list[Path]) -> Demo:
    d = build_demo(tmp_path / "demo", f"sqlite:///{tmp_path / 'demo' / 'collector.db'}", segment_files)
    yield d
    d.engine.dispose()


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "exam-collector"), "--config", str(config), *args], capture_output=True,
                          text=True, timeout=300)


def both_verdicts(package: Path, python: str = sys.executable) -> tuple[subprocess.CompletedProcess[str], ...]:
    """(exam-collector verify-package, python verify.py): the outputs and exit codes must be identical."""
    cli = subprocess.run([str(BIN / "exam-collector"), "verify-package", str(package)], capture_output=True,
                         text=True, timeout=300)
    script = subprocess.run([python, str(package / "verify.py"), str(package)], capture_output=True, text=True,
                            timeout=300, cwd="/")
    assert (cli.returncode, cli.stdout) == (script.returncode, script.stdout)
    return cli, script


def export(demo: Demo, batch: str, out: Path, **kw) -> Path:
    result = export_batch(demo.sessions, store=FilesystemStore(demo.storage), key=load_private_key(demo.key_file),
                          batch_id=batch, out=out, actor="inspector-test", reason="complaint 2026-17", **kw)
    return result.path


@pytest.mark.parametrize("backend", ["filesystem", "s3"])
def test_cli_export_verifies_ok_and_is_audited(tmp_path: Path, segment_files: list[Path], database_url: str,
                                               backend: str, request: pytest.FixtureRequest) -> None:
    """On both storage backends: the package holds the stored bytes (read back from the files, or from the object
    versions the rows name, which are locked at least until the rows say) and verifies OK."""
    bucket = request.getfixturevalue("s3_bucket") if backend == "s3" else None
    demo = build_demo(tmp_path / "demo", database_url, segment_files, s3=bucket)
    footage = StoredFootage(demo.storage, bucket)
    try:
        with demo.sessions() as s:
            rows = s.scalars(select(SegmentRecord).order_by(SegmentRecord.camera, SegmentRecord.seq)).all()
        footage.check_rows(rows, backend)
        config = demo.write_config()
        out = tmp_path / "pkg"
        done = run_cli(config, "export", "B-OK", "--out", str(out), "--reason", "投诉调查 case 17",
                       "--actor", "inspector-li")
        assert done.returncode == 0, done.stderr
        assert "100%" in done.stderr          # the progress bar
        originals = [footage.read(r.storage_path, r.storage_version) for r in rows
                     if r.institution == SITE_A.institution and r.kind == "segment"]
        copied = sorted((out / "segments").rglob("*.ts"))
        assert len(copied) == 6 and [p.read_bytes() for p in copied] == originals
        package = json.loads((out / "package.json").read_text(encoding="utf-8"))
        assert package["batch"]["id"] == "B-OK" and package["exported"]["by"] == "inspector-li"
        assert package["exported"]["reason"] == "投诉调查 case 17" and package["gaps"] == []
        agents_dir, fingerprint = out / "keys" / "agents", key_fingerprint(demo.cameras[SITE_A.institution].key)
        assert [p.relative_to(agents_dir).as_posix() for p in agents_dir.rglob("*") if p.is_file()] == [
            f"{SITE_A.agent}/{fingerprint}.pub"]
        assert "覆盖" in (out / "coverage.html").read_text(encoding="utf-8")
        cli, _ = both_verdicts(out)
        assert cli.returncode == 0 and cli.stdout.splitlines()[0] == OK
        with demo.sessions() as s:
            entries = s.scalars(select(AuditEntry).where(AuditEntry.action == ACTION_FOOTAGE_EXPORT)).all()
            checkpoints = s.scalars(select(AuditCheckpoint).where(AuditCheckpoint.occasion == "export")).all()
        assert [(e.actor, e.target, e.reason) for e in entries] == [("inspector-li", "B-OK", "投诉调查 case 17")]
        assert len(checkpoints) == 1 and package["exported"]["audit_entry"] == entries[0].seq
        assert package["exported"]["audit_checkpoint"]["signature"] == checkpoints[0].signature
    finally:
        demo.engine.dispose()


def test_verifier_checkpoint_format_matches_the_audit_log() -> None:
    from collector import audit, evidence_verify

    assert evidence_verify.CHECKPOINT_KIND == audit.CHECKPOINT_KIND


def test_flipped_byte_names_the_file(demo: Demo, tmp_path: Path) -> None:
    out = export(demo, "B-OK", tmp_path / "pkg")
    victim = sorted((out / "segments").rglob("*.ts"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    cli, _ = both_verdicts(out)
    assert cli.returncode == 4 and cli.stdout.splitlines()[0] == NOT_OK
    problems = [line for line in cli.stdout.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 1 and victim.relative_to(out).as_posix() in problems[0] and "SHA-256" in problems[0]


def test_removed_segment_is_not_ok(demo: Demo, tmp_path: Path) -> None:
    out = export(demo, "B-OK", tmp_path / "pkg")
    victim = sorted((out / "segments").rglob("*.ts"))[0]
    victim.unlink()
    cli, _ = both_verdicts(out)
    assert cli.returncode == 4 and cli.stdout.splitlines()[0] == NOT_OK
    assert f"PROBLEM: {victim.relative_to(out).as_posix()}: missing" in cli.stdout


def test_real_gap_is_ok_with_gaps_and_listed(demo: Demo, tmp_path: Path) -> None:
    out = export(demo, "B-GAP", tmp_path / "pkg")
    cli, _ = both_verdicts(out)
    assert cli.returncode == 3 and cli.stdout.splitlines()[0] == OK_WITH_GAPS
    gaps = [line for line in cli.stdout.splitlines() if line.startswith("GAP")]
    assert gaps == ["GAP: theory JL2201001-01/T101 camera t101-front: 2026-11-26 09:00:06 北京时间 – "
                    "2026-11-26 09:00:10 北京时间 (4.0 s; camera_unreachable)",
                    "GAP: theory JL2201001-01/T101 camera t101-front: 2026-11-26 09:00:12 北京时间 – "
                    "2026-11-26 09:00:14 北京时间 (2.0 s; health_frozen)"]
    # The viewing MP4s are split where footage is missing (not at the frozen stretch, which is footage),
    # stream-copied, and each really plays its 6 s.
    package = json.loads((out / "package.json").read_text(encoding="utf-8"))
    clips = package["viewing"]
    assert [(c["first_seq"], c["last_seq"]) for c in clips] == [(1, 3), (5, 7)]
    assert [(c["start_local"][11:19], c["end_local"][11:19]) for c in clips] == [("09:00:00", "09:00:06"),
                                                                                  ("09:00:10", "09:00:16")]
    for clip in clips:
        probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=codec_name",
                                "-of", "json", str(out / clip["path"])], capture_output=True, text=True, check=True)
        info = json.loads(probe.stdout)
        assert info["streams"][0]["codec_name"] == "h264"
        assert abs(float(info["format"]["duration"]) - 6.0) < 0.2
    readme = (out / "viewing" / "README.txt").read_text(encoding="utf-8")
    assert "2026-11-26 09:00:06 – 2026-11-26 09:00:10 (4.0 s)" in readme



def test_viewing_clip_equals_a_plain_concat_remux_of_its_segments(demo: Demo, tmp_path: Path) -> None:
    """The probe shortcut for a clip's later files changes nothing: same bytes as ffmpeg's concat demuxer
    with default probing, every packet of every segment in it."""
    out = export(demo, "B-GAP", tmp_path / "pkg")
    package = json.loads((out / "package.json").read_text(encoding="utf-8"))
    clip = package["viewing"][0]
    [camera] = [c for c in package["cameras"] if c["camera"] == "t101-front"]
    sources = [out / r["file"] for r in camera["records"]
               if r.get("file") and clip["first_seq"] <= r["seq"] <= clip["last_seq"]]
    assert len(sources) == 3
    listing = tmp_path / "plain.txt"
    listing.write_text("".join(f"file '{p}'\n" for p in sources), encoding="utf-8")
    plain = tmp_path / "plain.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "concat", "-safe", "0", "-i", str(listing),
                    "-map", "0", "-c", "copy", str(plain)], check=True)
    assert (out / clip["path"]).read_bytes() == plain.read_bytes()

    def packets(path: Path) -> int:
        probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_packets",
                                "-show_entries", "stream=nb_read_packets", "-of", "csv=p=0", str(path)],
                               capture_output=True, text=True, check=True)
        return int(probe.stdout.split()[-1])  # MPEG-TS lists the stream under its program too

    assert packets(out / clip["path"]) == sum(packets(p) for p in sources)


def test_hidden_gap_and_removed_record_are_caught_even_when_signed(demo: Demo, tmp_path: Path) -> None:
    """A collector that left a gap or a record out of a package it signed is still caught."""
    key = load_private_key(demo.key_file)
    out = export(demo, "B-GAP", tmp_path / "pkg")
    package = json.loads((out / "package.json").read_bytes())
    package["gaps"] = []
    data = json.dumps(package, ensure_ascii=False).encode("utf-8")
    (out / "package.json").write_bytes(data)
    (out / "package.sig").write_text(sign(key, data))
    result = verify_package(out)
    assert result.verdict == NOT_OK and len(result.problems) == 2
    assert all("hidden gap" in p for p in result.problems) and "09:00:12" in result.problems[1]

    out2 = export(demo, "B-OK", tmp_path / "pkg2")
    package = json.loads((out2 / "package.json").read_bytes())
    records = package["cameras"][0]["records"]
    dropped = records.pop(1)
    (out2 / dropped["file"]).unlink()
    data = json.dumps(package, ensure_ascii=False).encode("utf-8")
    (out2 / "package.json").write_bytes(data)
    (out2 / "package.sig").write_text(sign(key, data))
    result = verify_package(out2)
    assert result.verdict == NOT_OK
    assert any("seq 2..2 missing from the chain" in p for p in result.problems)
    assert any("hidden gap" in p for p in result.problems)


def test_edited_package_json_fails_the_collector_signature(demo: Demo, tmp_path: Path) -> None:
    out = export(demo, "B-GAP", tmp_path / "pkg")
    text = (out / "package.json").read_text(encoding="utf-8").replace("camera_unreachable", "agent_stopped")
    (out / "package.json").write_text(text, encoding="utf-8")
    result = verify_package(out)
    assert result.verdict == NOT_OK
    assert any("collector signature (package.sig) does not verify" in p for p in result.problems)
    # A forged audit checkpoint (re-signed package, checkpoint signature not the collector's) is caught.
    key = load_private_key(demo.key_file)
    out3 = export(demo, "B-OK", tmp_path / "pkg3")
    package = json.loads((out3 / "package.json").read_bytes())
    package["exported"]["audit_checkpoint"]["entry_count"] += 1
    data = json.dumps(package, ensure_ascii=False).encode("utf-8")
    (out3 / "package.json").write_bytes(data)
    (out3 / "package.sig").write_text(sign(key, data))
    assert verify_package(out3).problems == ["package.json: the audit checkpoint is not signed by the collector key"]
    wrong = verify_package(export(demo, "B-OK", tmp_path / "pkg2"), expect_key="A" * 43 + "=")
    assert wrong.verdict == NOT_OK and "not the collector key given" in wrong.problems[0]


def test_zip_export_verifies(demo: Demo, tmp_path: Path) -> None:
    path = export(demo, "B-OK", tmp_path / "pkg", settings=ExportSettings(make_zip=True))
    assert path == tmp_path / "pkg.zip" and zipfile.is_zipfile(path) and not (tmp_path / "pkg").exists()
    done = subprocess.run([str(BIN / "exam-collector"), "verify-package", str(path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("OK\n")


def test_export_refuses_without_reason_or_into_a_full_folder(demo: Demo, tmp_path: Path) -> None:
    config = demo.write_config()
    done = run_cli(config, "export", "B-OK", "--out", str(tmp_path / "x"), "--reason", "  ")
    assert done.returncode == 1 and "needs a reason" in done.stderr and len(done.stderr.splitlines()) == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export(demo, "B-OK", tmp_path / "full")
    done = run_cli(config, "export", "NOPE", "--out", str(tmp_path / "y"), "--reason", "r")
    assert done.returncode == 1 and "not imported" in done.stderr
    assert run_cli(config, "verify-package", str(tmp_path / "full")).returncode == 1


def test_verify_py_in_a_fresh_venv_with_only_cryptography(demo: Demo, tmp_path: Path) -> None:
    out = export(demo, "B-GAP", tmp_path / "pkg")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([py, "-m", "pip", "install", "-q", "cryptography"], check=True, env=environ, timeout=600)
    listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True,
                            env=environ)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "cryptography" in names and not names & {"exam-footage", "sqlalchemy", "click", "fastapi"}
    fresh = subprocess.run([py, str(out / "verify.py"), str(out)], capture_output=True, text=True, env=environ,
                           cwd="/", timeout=300)
    assert fresh.returncode == 3 and fresh.stdout.splitlines()[0] == OK_WITH_GAPS
    cli, _ = both_verdicts(out)
    assert cli.stdout == fresh.stdout


def test_damaged_storage_is_reported_at_export_with_check_hashes(demo: Demo, tmp_path: Path) -> None:
    stored = sorted((demo.storage / SITE_A.institution).rglob("*.ts"))[0]
    data = bytearray(stored.read_bytes())
    data[1000] ^= 0xFF
    stored.write_bytes(bytes(data))
    config = demo.write_config()
    checked = run_cli(config, "export", "B-OK", "--out", str(tmp_path / "a"), "--reason", "r", "--check-hashes")
    assert checked.returncode == 4 and "does not match its signed manifest" in checked.stderr
    fast = run_cli(config, "export", "B-OK", "--out", str(tmp_path / "b"), "--reason", "r")
    assert fast.returncode == 0
    for out in (tmp_path / "a", tmp_path / "b"):
        result = verify_package(out)
        assert result.verdict == NOT_OK and stored.name in result.problems[0]


def test_two_runs_taken_for_one_are_remuxed_file_by_file(tmp_path: Path, caplog) -> None:
    """Segments of two ffmpeg runs joined as one byte stream lose footage (their timestamps restart);
    make_clip notices by the MP4's length and remuxes file by file, so the clip has all of it."""
    from collector.viewing import ClipSources, make_clip, mp4_seconds

    runs = []
    for name in ("a", "b"):
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                        "testsrc2=size=320x240:rate=25", "-t", "4", "-c:v", "libx264", "-preset", "ultrafast",
                        "-g", "25", "-pix_fmt", "yuv420p", "-f", "segment", "-segment_time", "2",
                        "-segment_format", "mpegts", str(tmp_path / f"{name}-%03d.ts")], check=True)
        runs.append(sorted(tmp_path.glob(f"{name}-*.ts")))
    assert [len(r) for r in runs] == [2, 2]
    one_run = tmp_path / "one.mp4"
    make_clip(ClipSources((tuple(runs[0]),), 4.0), one_run)
    assert abs(mp4_seconds(one_run) - 4.0) < 0.05
    wrong = tmp_path / "wrong.mp4"
    with caplog.at_level("WARNING", logger="collector.viewing"):
        make_clip(ClipSources((tuple(runs[0] + runs[1]),), 8.0), wrong)
    assert "remuxing file by file" in caplog.text
    assert abs(mp4_seconds(wrong) - 8.0) < 0.05
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                            str(wrong)], capture_output=True, text=True, check=True)
    assert abs(float(probe.stdout) - mp4_seconds(wrong)) < 0.01


def test_clip_sources_group_one_runs_segments_only(tmp_path: Path) -> None:
    """Segments join a group only when each starts at the very millisecond the previous one ended, no path
    holds a `|`, and the concat URL stays short; otherwise a new group (the demuxer joins groups)."""
    from datetime import datetime, timedelta, timezone

    from collector.viewing import MAX_GROUP_URL, clip_sources
    from collector.models import SegmentRecord

    t0 = datetime(2026, 11, 26, 1, 0, tzinfo=timezone.utc)

    def seg(name: str, start: float, end: float) -> SegmentRecord:
        return SegmentRecord(storage_path=name, start_at=t0 + timedelta(seconds=start),
                             end_at=t0 + timedelta(seconds=end), duration=end - start)

    run = [seg("a.ts", 0, 2), seg("b.ts", 2, 4), seg("c.ts", 4.001, 6), seg("d|e.ts", 6, 8), seg("f.ts", 8, 10)]
    sources = clip_sources(run, [tmp_path / r.storage_path for r in run])
    assert [[p.name for p in g] for g in sources.groups] == [["a.ts", "b.ts"], ["c.ts"], ["d|e.ts"], ["f.ts"]]
    assert abs(sources.seconds - 9.999) < 1e-9 and sources.files == 5
    assert [len(g) for g in sources.one_per_file().groups] == [1] * 5
    many = [seg(f"{i:04d}-{'x' * 60}.ts", 2 * i, 2 * i + 2) for i in range(200)]
    groups = clip_sources(many, [tmp_path / r.storage_path for r in many]).groups
    assert len(groups) > 1 and sum(len(g) for g in groups) == 200
    assert all(sum(len(str(p)) + 1 for p in g) <= MAX_GROUP_URL for g in groups)


# ---------------------------------------------------------------------------- agent keys replaced over time

LABEL = f"{SITE_A.venue}/{SITE_A.camera}"
ROTATION_CSV = ("batch_id,institution,venue,occupation,level,part,room,start,end\n"
                f"B-KEYS,{SITE_A.institution},{SITE_A.venue},电工,四级,theory,{SITE_A.room},"
                "2026-11-26T09:00:00,2026-11-26T09:00:08\n")


@dataclass
class Rotated:
    demo: Demo
    old: Ed25519PrivateKey
    new: Ed25519PrivateKey

    @property
    def fingerprints(self) -> tuple[str, str]:
        return key_fingerprint(self.old), key_fingerprint(self.new)


@pytest.fixture
def rotated(tmp_path: Path, segment_files: list[Path], database_url: str) -> Iterator[Rotated]:
    """Camera t101-front stores seq 1-2 (09:00:00-09:00:04) signed with key A; then `enroll --replace` gives
    the agent key B and the same chain goes on with seq 3-4 (09:00:04-09:00:08) signed with B. Batch B-KEYS
    covers exactly 09:00:00-09:00:08, so its package has no gap."""
    root = tmp_path / "rotated"
    root.mkdir()
    engine = make_engine(database_url)
    upgrade(engine)
    sessions = session_factory(engine)
    key_file = root / "collector.key"
    generate_private_key(key_file)
    storage = root / "storage"
    demo = Demo(root, database_url, engine, sessions, storage, key_file, Ingest(engine, storage))
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    camera = demo.cameras[SITE_A.institution] = Camera(SITE_A, old)
    enroll(sessions, SITE_A.agent, SITE_A.venue, public_key_b64(old), SITE_A.institution)
    data = [f.read_bytes() for f in segment_files]
    step = timedelta(seconds=SEGMENT_SECONDS)
    for i in range(4):
        if i == 2:
            enroll(sessions, SITE_A.agent, SITE_A.venue, public_key_b64(new), replace=True)
            camera.key = new
        demo.send(camera, camera.manifest("segment", BASE + i * step, SEGMENT_SECONDS, data[i]), data[i])
    with sessions.begin() as session:
        import_batches(session, ROTATION_CSV.encode("utf-8"), source="rotation.csv", actor="test-setup")
    yield Rotated(demo, old, new)
    engine.dispose()


def resign(out: Path, package: dict[str, Any], key: Ed25519PrivateKey) -> None:
    """What only the collector can do: write package.json and sign it again."""
    data = json.dumps(package, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")
    (out / "package.json").write_bytes(data)
    (out / "package.sig").write_text(sign(key, data) + "\n", encoding="ascii")


def key_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out / "keys").as_posix() for p in (out / "keys").rglob("*") if p.is_file())


def test_export_after_key_replacement_carries_every_key_and_verifies_ok(rotated: Rotated, tmp_path: Path) -> None:
    """Footage signed before and after `enroll --replace` verifies: each record names the key that verified
    it at ingest, and the package carries both keys with their validity. (It used to carry only the current
    key, so everything signed before the replacement was NOT_OK.)"""
    fp_a, fp_b = rotated.fingerprints
    with rotated.demo.sessions() as s:
        history = agent_keys(s, [SITE_A.agent])
        stored = s.scalars(select(SegmentRecord).order_by(SegmentRecord.seq)).all()
    assert [r.key_fingerprint for r in stored] == [fp_a, fp_a, fp_b, fp_b]
    out = export(rotated.demo, "B-KEYS", tmp_path / "pkg")

    assert key_files(out) == sorted([f"agents/{SITE_A.agent}/{fp_a}.pub", f"agents/{SITE_A.agent}/{fp_b}.pub",
                                     "collector.pub"])
    for private, fingerprint in ((rotated.old, fp_a), (rotated.new, fp_b)):
        assert (out / "keys" / "agents" / SITE_A.agent / f"{fingerprint}.pub").read_text(encoding="ascii") == (
            public_key_b64(private) + "\n")
    package = json.loads((out / "package.json").read_text(encoding="utf-8"))
    assert package["v"] == 2
    assert [k.fingerprint for k in history] == [fp_a, fp_b] and history[0].valid_to == history[1].valid_from
    assert package["keys"]["agents"] == {SITE_A.agent: [
        {"fingerprint": fp_a, "public_key": public_key_b64(rotated.old),
         "valid_from": format_time(history[0].valid_from), "valid_to": format_time(history[0].valid_to),
         "retired_reason": f"replaced by key {fp_b} (enroll --replace)"},
        {"fingerprint": fp_b, "public_key": public_key_b64(rotated.new),
         "valid_from": format_time(history[1].valid_from), "valid_to": None, "retired_reason": None}]}
    [camera] = package["cameras"]
    records = camera["records"]
    assert [(r["seq"], r["key"]) for r in records] == [(1, fp_a), (2, fp_a), (3, fp_b), (4, fp_b)]
    # one chain across the replacement: seq 3 (key B) links to seq 2 (key A)
    assert json.loads(records[2]["manifest"])["prev"] == hashlib.sha256(records[1]["manifest"].encode()).hexdigest()
    assert package["gaps"] == [] and camera["holes"] == []

    cli, _ = both_verdicts(out)          # exam-collector verify-package and the shipped verify.py, as subprocesses
    assert cli.returncode == 0 and cli.stdout.splitlines()[0] == OK, cli.stdout


def test_swapped_or_unlisted_agent_key_is_not_ok_naming_records_and_key_file(rotated: Rotated,
                                                                            tmp_path: Path) -> None:
    fp_a, fp_b = rotated.fingerprints
    key_a = f"keys/agents/{SITE_A.agent}/{fp_a}.pub"
    # key A's file holds key B: the file does not hash to its name, and seq 1-2 (signed with A) are not verified
    out = export(rotated.demo, "B-KEYS", tmp_path / "pkg")
    (out / key_a).write_text(public_key_b64(rotated.new) + "\n", encoding="ascii")
    cli, _ = both_verdicts(out)
    assert cli.returncode == 4 and cli.stdout.splitlines()[0] == NOT_OK
    assert verify_package(out).problems == [
        f"{key_a}: holds a key whose SHA-256 is {fp_b}, not {fp_a}: the key file was replaced or altered",
        f"{LABEL} seq 1..2: signed with key {fp_a}, whose key file {key_a} is not usable: the signature cannot be "
        "checked"]

    # package.json (signed again by the collector) no longer lists key A: seq 1-2 name a key the package lacks
    collector_key = load_private_key(rotated.demo.key_file)
    out = export(rotated.demo, "B-KEYS", tmp_path / "pkg2")
    package = json.loads((out / "package.json").read_bytes())
    package["keys"]["agents"][SITE_A.agent] = [k for k in package["keys"]["agents"][SITE_A.agent]
                                               if k["fingerprint"] != fp_a]
    resign(out, package, collector_key)
    assert verify_package(out).problems == [
        f"{LABEL} seq 1..2: signed with key {fp_a}, which the package does not carry for agent {SITE_A.agent} "
        f"(no {key_a} listed in package.json): the signature cannot be checked",
        f"{key_a}: a key file package.json does not list"]

    # a record that names the other key of its agent: its signature does not verify with that key
    out = export(rotated.demo, "B-KEYS", tmp_path / "pkg3")
    package = json.loads((out / "package.json").read_bytes())
    package["cameras"][0]["records"][0]["key"] = fp_b
    resign(out, package, collector_key)
    assert verify_package(out).problems == [
        f"{LABEL} seq 1: the agent signature on the manifest does not verify with its key "
        f"keys/agents/{SITE_A.agent}/{fp_b}.pub"]


def to_old_layout(out: Path, collector_key: Ed25519PrivateKey) -> None:
    """Rewrite a package as exports before key history wrote it (package v 1): one keys/agents/{agent}.pub,
    `keys.agents` {agent: public key}, no `key` in the records; package.json signed again by the collector."""
    package = json.loads((out / "package.json").read_bytes())
    agents = {}
    for agent, keys in package["keys"]["agents"].items():
        [current] = [k for k in keys if k["valid_to"] is None]
        agents[agent] = current["public_key"]
        shutil.rmtree(out / "keys" / "agents" / agent)
        (out / "keys" / "agents" / f"{agent}.pub").write_text(current["public_key"] + "\n", encoding="ascii")
    package["v"], package["keys"]["agents"] = 1, agents
    for camera in package["cameras"]:
        for record in camera["records"]:
            del record["key"]
    resign(out, package, collector_key)


def test_package_in_the_layout_before_key_history_still_verifies(tmp_path: Path, segment_files: list[Path],
                                                                 database_url: str) -> None:
    demo = build_demo(tmp_path / "demo", database_url, segment_files)
    try:
        out = export(demo, "B-OK", tmp_path / "pkg")
        to_old_layout(out, load_private_key(demo.key_file))
        assert key_files(out) == [f"agents/{SITE_A.agent}.pub", "collector.pub"]
        cli, _ = both_verdicts(out)
        assert cli.returncode == 0 and cli.stdout.splitlines()[0] == OK, cli.stdout
        # the fallback still checks every signature, with keys/agents/{agent}.pub
        other = public_key_b64(Ed25519PrivateKey.generate())
        (out / "keys" / "agents" / f"{SITE_A.agent}.pub").write_text(other + "\n", encoding="ascii")
        seqs = [r["seq"] for r in json.loads((out / "package.json").read_bytes())["cameras"][0]["records"]]
        assert seqs == list(range(1, 8))
        assert verify_package(out).problems == [
            f"{LABEL} seq {seq}: the agent signature on the manifest does not verify" for seq in seqs]
    finally:
        demo.engine.dispose()


def test_records_without_or_with_an_unknown_stored_key(tmp_path: Path, segment_files: list[Path],
                                                       database_url: str) -> None:
    """Rows stored before key history name no key: they were verified with the agent's current key, and the
    package says so. A row naming a key the agent's history lacks is a source problem and NOT_OK."""
    demo = build_demo(tmp_path / "demo", database_url, segment_files)
    try:
        current = key_fingerprint(demo.cameras[SITE_A.institution].key)
        with demo.sessions.begin() as s:
            s.execute(update(SegmentRecord).values(key_fingerprint=None))
        result = export_batch(demo.sessions, store=FilesystemStore(demo.storage), key=load_private_key(demo.key_file),
                              batch_id="B-OK", out=tmp_path / "pkg", actor="inspector-test", reason="r")
        package = json.loads((result.path / "package.json").read_bytes())
        assert {r["key"] for r in package["cameras"][0]["records"]} == {current}
        assert result.source_problems == () and verify_package(result.path).verdict == OK

        unknown = "0" * 64
        with demo.sessions.begin() as s:
            s.execute(update(SegmentRecord).where(SegmentRecord.venue == SITE_A.venue, SegmentRecord.seq == 2)
                      .values(key_fingerprint=unknown))
        result = export_batch(demo.sessions, store=FilesystemStore(demo.storage), key=load_private_key(demo.key_file),
                              batch_id="B-OK", out=tmp_path / "pkg2", actor="inspector-test", reason="r")
        assert result.source_problems == (
            f"{LABEL} seq 2: verified at ingest with key {unknown}, which is not in agent {SITE_A.agent}'s key "
            "history (agent_key): the package cannot carry it",)
        assert verify_package(result.path).problems == [
            f"{LABEL} seq 2: signed with key {unknown}, which the package does not carry for agent {SITE_A.agent} "
            f"(no keys/agents/{SITE_A.agent}/{unknown}.pub listed in package.json): the signature cannot be checked"]
    finally:
        demo.engine.dispose()


def test_stored_path_outside_storage_is_a_source_problem_and_not_read(tmp_path: Path, segment_files: list[Path],
                                                                      database_url: str) -> None:
    """A row whose storage_path leaves storage_dir is reported like a missing file, even when a file with the
    right bytes is there: export reads stored files only through the footage store."""
    demo = build_demo(tmp_path / "demo", database_url, segment_files)
    try:
        with demo.sessions.begin() as s:
            row = s.scalars(select(SegmentRecord).where(SegmentRecord.venue == SITE_A.venue,
                                                        SegmentRecord.seq == 2)).one()
            shutil.copyfile(demo.storage / row.storage_path, tmp_path / "outside.ts")
            row.storage_path = os.path.relpath(tmp_path / "outside.ts", demo.storage)
            assert row.storage_path == "../../outside.ts"
        result = export_batch(demo.sessions, store=FilesystemStore(demo.storage), key=load_private_key(demo.key_file),
                              batch_id="B-GAP", out=tmp_path / "pkg", actor="inspector-test", reason="r")
        assert result.source_problems == (
            f"{LABEL} seq 2: stored file not read: storage path '../../outside.ts' has the component '..', which "
            "is not a plain name",)
        copied = result.path / "segments" / SITE_A.venue / SITE_A.camera / "outside.ts"
        assert not copied.exists()
        assert [(c.first_seq, c.last_seq) for c in result.clips] == [(5, 7)]   # no clip over the unread file
        verdict = verify_package(result.path)
        assert verdict.verdict == NOT_OK
        assert [p for p in verdict.problems if "outside.ts" in p] == [
            f"{copied.relative_to(result.path).as_posix()}: missing (segment {LABEL} seq 2)"]
    finally:
        demo.engine.dispose()


def test_files_present_must_equal_files_listed(demo: Demo, tmp_path: Path) -> None:
    """An unlisted MP4 in viewing/, a hidden file in segments/, a stray folder, a symbolic link: NOT_OK naming
    each, from both verifiers (the package's own verify.py and exam-collector verify-package)."""
    out = export(demo, "B-OK", tmp_path / "pkg")
    clip = next((out / "viewing").glob("*.mp4"))
    shutil.copyfile(clip, out / "viewing" / "doctored.mp4")
    segment = next((out / "segments").rglob("*.ts"))
    (segment.parent / ".hidden").write_bytes(b"x")
    (out / "extra").mkdir()
    real = tmp_path / "outside.ts"
    shutil.copyfile(segment, real)
    segment.unlink()
    segment.symlink_to(real)   # the same bytes, through a link
    cli, script = both_verdicts(out)
    assert cli.returncode == 4 and cli.stdout.startswith("NOT_OK")
    rel_segment = segment.relative_to(out).as_posix()
    problems = verify_package(out).problems
    assert "viewing/doctored.mp4: a file package.json does not list" in problems
    assert f"{(segment.parent / '.hidden').relative_to(out).as_posix()}: a file package.json does not list" in problems
    assert "extra/: a folder package.json lists nothing in" in problems
    assert f"{rel_segment}: a symbolic link; a package holds no links (not followed)" in problems


def test_a_second_folder_in_a_zip_is_not_ok(demo: Demo, tmp_path: Path) -> None:
    out = export(demo, "B-OK", tmp_path / "pkg")
    archive = tmp_path / "evidence.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(out.rglob("*")):
            if path.is_file():
                z.write(path, f"pkg/{path.relative_to(out).as_posix()}")
        z.writestr("other/copy.ts", b"not part of the package")
    result = verify_package(archive)
    assert result.verdict == NOT_OK
    assert result.problems == ["other: in the zip beside the package folder, which holds nothing else"]


def test_the_verdict_says_whether_the_collector_key_was_pinned(demo: Demo, tmp_path: Path) -> None:
    out = export(demo, "B-OK", tmp_path / "pkg")
    fingerprint = key_fingerprint(load_private_key(demo.key_file))
    unpinned = verify_package(out)
    assert unpinned.verdict == OK and not unpinned.key_pinned and unpinned.collector_fingerprint == fingerprint
    assert f"SHA-256 fingerprint {fingerprint} (taken from the package, NOT pinned" in unpinned.render()
    pinned = subprocess.run([sys.executable, str(out / "verify.py"), str(out), "--expect-key", fingerprint],
                            capture_output=True, text=True, timeout=300, cwd="/")
    assert pinned.returncode == 0 and f"SHA-256 fingerprint {fingerprint} (pinned with --expect-key)" in pinned.stdout
    other = key_fingerprint(Ed25519PrivateKey.generate())
    cli = subprocess.run([str(BIN / "exam-collector"), "verify-package", str(out), "--expect-key", other],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 4 and f"is not the collector key given with --expect-key ({other})" in cli.stdout


def test_the_shipped_verifier_stays_python_3_8() -> None:
    """verify.py runs wherever a third party has Python 3.8+: its syntax, and no call that 3.8 lacks."""
    import ast

    import collector.evidence_verify as verifier

    tree = ast.parse(Path(verifier.__file__).read_text(encoding="utf-8"), feature_version=(3, 8))
    too_new = {("zip", "strict"), ("removeprefix", None), ("removesuffix", None)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            for wanted, keyword in too_new:
                if name == wanted and (keyword is None or any(k.arg == keyword for k in node.keywords)):
                    found.append(f"line {node.lineno}: {wanted}({keyword or ''}...)")
    assert found == []
