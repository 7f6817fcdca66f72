"""Evidence packages (docs/evidence-package.md): a batch's footage as a folder or zip a stranger can check.

Layout of a package:
  package.json        batch, parts, cameras with every record's manifest and signature, chain holes, gaps,
                      coverage, who exported it, when and why, the audit checkpoint; and the size and SHA-256
                      of every other file below
  package.sig         base64 Ed25519 signature by the collector key over the exact bytes of package.json
  keys/               collector.pub and agents/{agent}/{fingerprint}.pub (base64 raw 32-byte keys): every key
                      of each agent with an exported record, the retired ones too; package.json's
                      keys.agents gives each key's validity, and every record names the `key` (SHA-256
                      fingerprint of the raw key) that verified it at ingest. Packages before v 2 had one
                      keys/agents/{agent}.pub and no `key` per record; verify.py still reads them.
  segments/           {venue}/{camera}/{file}: the stored files, bit-identical
  viewing/            per-camera MP4s stream-copied (concat demuxer, `-c copy`), split at every gap, and a
                      README.txt listing each clip and each gap between clips in Asia/Shanghai time
  coverage.json       the coverage report; coverage.html the same in zh-CN
  verify.py           collector/evidence_verify.py, the one verifier (needs Python 3 and `cryptography`)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from io import RawIOBase
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import format_time, truncate_to_millis
from exam_contract.files import hash_file
from exam_contract.signing import key_fingerprint, public_key_b64, sign

from . import audit
from .batches import BatchReport, batch_report, linked_records, report_json
from .coverage import DISQUALIFYING_HEALTH
from .admin import KeyView, agent_keys
from .evidence_verify import PACKAGE_FORMAT
from .footage_store import FootageStore, UnsafePath
from .models import Agent, SegmentRecord
from .package_text import PACKAGE_README, coverage_html, local_iso
from .viewing import CameraRecords, Clip, ViewingCopies

log = logging.getLogger(__name__)

PACKAGE_VERSION = 2   # 2: agent keys by fingerprint with their validity, every record names its key
COPY_BLOCK = 8 << 20
VERIFIER_SOURCE = Path(__file__).resolve().parent / "evidence_verify.py"
Progress = Callable[[int, int], None]


class ExportError(Exception):
    """The export cannot be made; the message says why and what to do."""


@dataclass(frozen=True)
class ExportSettings:
    tolerance_seconds: float = 2.0
    pre_margin_minutes: int = 15
    post_margin_minutes: int = 15
    viewing: bool = True          # per-camera MP4s (needs ffmpeg)
    make_zip: bool = False
    # Re-hash every stored file while copying, to report a damaged source at export time. Off by default:
    # a kernel copy is about 2.5x faster than hashing here, and verify.py checks every hash in any case.
    check_hashes: bool = False


@dataclass(frozen=True)
class ExportResult:
    batch_id: str
    path: Path                    # the folder, or the zip with --zip
    segments: int
    bytes: int
    gaps: tuple[dict[str, Any], ...]
    clips: tuple[Clip, ...]
    # stored files that are missing, unsafe or differ from their manifest; records whose key is not on file
    source_problems: tuple[str, ...]
    audit_seq: int
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class PackageKeys:
    """The agent keys a package carries: the whole key history (oldest first) of every agent with an exported
    record, not only the keys that signed one, so a retirement's reason ("replaced by key …") names a key the
    package holds and the list equals what `exam-collector keys` shows for the agent."""

    history: dict[str, tuple[KeyView, ...]]
    current: dict[str, str]     # agent -> fingerprint of its enrolled key (Agent.public_key)

    def of(self, record: SegmentRecord) -> str:
        """The fingerprint of the key that verified `record` at ingest. Rows stored before key history (and
        not migrated) name none: the agent had one key then, its current one."""
        return record.key_fingerprint or self.current.get(record.agent_id, "")

    def entries(self, agent: str) -> list[dict[str, Any]]:
        return [{"fingerprint": k.fingerprint, "public_key": k.public_key, "valid_from": format_time(k.valid_from),
                 "valid_to": format_time(k.valid_to) if k.valid_to is not None else None,
                 "retired_reason": k.retired_reason} for k in self.history.get(agent, ())]


def _gaps(report: BatchReport) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in report.parts:
        if not part.coverage.cameras:
            out.append({"part": part.part, "venue": part.venue, "room": part.room, "camera": "",
                        "start": format_time(part.start), "end": format_time(part.end),
                        "start_local": local_iso(part.start), "end_local": local_iso(part.end),
                        "seconds": round((part.end - part.start).total_seconds(), 3), "causes": ["no_camera"]})
        for cam in part.coverage.cameras:
            for gap in cam.gaps:
                out.append({"part": part.part, "venue": part.venue, "room": part.room, "camera": cam.camera,
                            "start": format_time(gap.start), "end": format_time(gap.end),
                            "start_local": local_iso(gap.start), "end_local": local_iso(gap.end),
                            "seconds": round(gap.seconds, 3), "causes": list(gap.causes)})
    return out


def collect(session: Session, batch_id: str, settings: ExportSettings,
            staging_dir: Path | None = None) -> tuple[BatchReport, list[CameraRecords], PackageKeys]:
    """The batch's coverage, its linked records per camera (seq order) and its agents' keys."""
    report = batch_report(session, batch_id, tolerance_seconds=settings.tolerance_seconds,
                          pre_margin_minutes=settings.pre_margin_minutes,
                          post_margin_minutes=settings.post_margin_minutes, staging_dir=staging_dir)
    pre, post = timedelta(minutes=settings.pre_margin_minutes), timedelta(minutes=settings.post_margin_minutes)
    cameras: dict[tuple[str, str], dict[int, SegmentRecord]] = {}
    for part in report.parts:
        for record in linked_records(session, part.venue, part.room, part.start - pre, part.end + post):
            cameras.setdefault((record.venue, record.camera), {})[record.id] = record
    out = [CameraRecords(venue, camera, sorted(rows.values(), key=lambda r: r.seq))
           for (venue, camera), rows in sorted(cameras.items())]
    agent_ids = sorted({r.agent_id for c in out for r in c.records})
    return report, out, _package_keys(session, agent_ids)


def _package_keys(session: Session, agent_ids: list[str]) -> PackageKeys:
    if not agent_ids:
        return PackageKeys({}, {})
    history: dict[str, list[KeyView]] = {agent: [] for agent in agent_ids}
    current: dict[str, str] = {}
    for view in agent_keys(session, agent_ids):
        history[view.agent].append(view)
    for agent in session.scalars(select(Agent).where(Agent.id.in_(agent_ids))):
        fingerprint = key_fingerprint(agent.public_key)
        current[agent.id] = fingerprint
        if not any(k.fingerprint == fingerprint for k in history[agent.id]):
            # an enrolment from before key history that nothing has touched since: its key is the current one
            history[agent.id].append(KeyView(agent.id, agent.public_key, fingerprint, agent.enrolled_at, None, None))
    return PackageKeys({agent: tuple(views) for agent, views in history.items()}, current)


def _holes(records: list[SegmentRecord]) -> list[dict[str, Any]]:
    return [{"first_seq": a.seq + 1, "last_seq": b.seq - 1, "after": format_time(a.end_at),
             "before": format_time(b.start_at)}
            for a, b in zip(records, records[1:], strict=False) if b.seq > a.seq + 1]


def copy_and_hash(fin: RawIOBase, dst: Path, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Copy the open `fin` to `dst` in one pass, hashing the bytes on the way (sha256 hex, size)."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(COPY_BLOCK)
    view = memoryview(buffer)
    with open(dst, "wb", buffering=0) as fout:
        while True:
            n = fin.readinto(buffer)
            if not n:
                break
            chunk = view[:n]
            digest.update(chunk)
            fout.write(chunk)
            size += n
            if progress is not None:
                progress(n)
    return digest.hexdigest(), size


def _file_entry(root: Path, path: Path) -> dict[str, Any]:
    sha256, size = hash_file(path)
    return {"path": path.relative_to(root).as_posix(), "size": size, "sha256": sha256}


def _key_problems(cameras: list[CameraRecords], keys: PackageKeys) -> list[str]:
    """Records whose key the package cannot carry (not in their agent's key history): verify.py will say NOT_OK."""
    problems: list[str] = []
    known = {agent: {k.fingerprint for k in views} for agent, views in keys.history.items()}
    for cam in cameras:
        for r in cam.records:
            fingerprint = keys.of(r)
            if fingerprint not in known.get(r.agent_id, set()):
                problems.append(f"{r.venue}/{r.camera} seq {r.seq}: verified at ingest with key "
                                f"{fingerprint or '(none)'}, which is not in agent {r.agent_id}'s key history "
                                "(agent_key): the package cannot carry it")
    return problems


def _copy_segments(cameras: list[CameraRecords], folder: Path, store: FootageStore, check_hashes: bool,
                   advance: Callable[[int], None],
                   keys: PackageKeys) -> tuple[list[dict[str, Any]], list[str]]:
    """Copy every stored segment into segments/; package.json's camera entries and the source problems."""
    problems: list[str] = []
    camera_entries: list[dict[str, Any]] = []
    for cam in cameras:
        entries = []
        for r in cam.records:
            item: dict[str, Any] = {"seq": r.seq, "kind": r.kind, "manifest": r.manifest, "signature": r.signature,
                                    "key": keys.of(r)}
            if r.kind == "segment":
                name = Path(r.storage_path).name if r.storage_path else f"{r.camera}-{r.seq}.ts"
                rel = f"segments/{r.venue}/{r.camera}/{name}"
                item["file"] = rel
                dst = folder / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    present = r.storage_path is not None and store.exists(r.storage_path, r.storage_version)
                except UnsafePath as exc:
                    problems.append(f"{r.venue}/{r.camera} seq {r.seq}: stored file not read: {exc}")
                    advance(r.size)
                    entries.append(item)
                    continue
                if not present or r.storage_path is None or r.deleted_at is not None:
                    problems.append(f"{r.venue}/{r.camera} seq {r.seq}: stored file "
                                    f"{r.storage_path or '-'} is missing (deleted {r.deleted_at or 'no'})")
                    advance(r.size)
                else:
                    sha: str | None
                    # Object storage is streamed into the package (hashed on the way: no extra read); a local
                    # file is copied by the kernel unless its hash is to be checked.
                    if check_hashes or store.versioned:
                        with store.open(r.storage_path, r.storage_version) as source:
                            sha, size = copy_and_hash(source, dst, advance)
                    else:
                        with store.local_path(r.storage_path, r.storage_version) as local:
                            shutil.copyfile(local, dst)   # sendfile/copy_file_range: the bytes stay in the kernel
                        sha, size = r.sha256, dst.stat().st_size
                        advance(size)
                    if sha != r.sha256 or size != r.size:
                        problems.append(f"{r.venue}/{r.camera} seq {r.seq}: stored file {r.storage_path} "
                                        "does not match its signed manifest (hash or size)")
            entries.append(item)
        first = cam.records[0]
        camera_entries.append({"venue": cam.venue, "camera": cam.camera, "agent": first.agent_id,
                               "institution": first.institution, "room": first.room, "room_kind": first.room_kind,
                               "records": entries, "holes": _holes(cam.records)})
    return camera_entries, problems


def export_batch(sessions: sessionmaker[Session], *, store: FootageStore, key: Ed25519PrivateKey, batch_id: str,
                 out: Path, actor: str, reason: str, settings: ExportSettings = ExportSettings(),
                 staging_dir: Path | None = None, progress: Progress | None = None) -> ExportResult:
    """Write the evidence package of `batch_id` to `out` (a new folder; `out`.zip with make_zip)."""
    reason = (reason or "").strip()
    if not reason:
        raise ExportError("an export needs a reason (--reason TEXT): say why the footage is handed on")
    out = Path(out)
    zip_path = (out if out.suffix == ".zip" else out.with_name(out.name + ".zip")) if settings.make_zip else None
    folder = out.with_suffix("") if zip_path is not None and out.suffix == ".zip" else out
    for target in (folder, zip_path):
        if target is not None and target.exists() and (target.is_file() or any(target.iterdir())):
            raise ExportError(f"{target} already exists and is not empty: choose a new --out")
    with sessions() as session:
        report, cameras, keys = collect(session, batch_id, settings, staging_dir)
    tolerance = timedelta(seconds=settings.tolerance_seconds)
    gaps = _gaps(report)
    segments = [r for c in cameras for r in c.records if r.kind == "segment"]
    total = sum(r.size for r in segments)
    now = truncate_to_millis(datetime.now(timezone.utc))

    with sessions.begin() as session:
        entry = audit.record(session, audit.ACTION_FOOTAGE_EXPORT, actor=actor, target=batch_id, reason=reason,
                             detail={"out": str(zip_path or folder), "segments": len(segments), "bytes": total,
                                     "cameras": [f"{c.venue}/{c.camera} seq {c.records[0].seq}..{c.records[-1].seq}"
                                                 for c in cameras if c.records],
                                     "gaps": len(gaps)})
        audit_seq = entry.seq
    checkpoint = audit.checkpoint_for_export(sessions, key)
    log.info("export of batch %s by %s (audit entry %s): %s segments, %s bytes", batch_id, actor, audit_seq,
             len(segments), total)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keys" / "agents").mkdir(parents=True, exist_ok=True)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    # The viewing MP4s are remuxed from the stored files while the copy runs.
    viewing = ViewingCopies(cameras, tolerance, store, folder, wanted=settings.viewing and bool(segments))
    try:
        camera_entries, source_problems = _copy_segments(cameras, folder, store, settings.check_hashes, advance,
                                                         keys)
    except BaseException:
        viewing.cancel()
        raise
    clips = viewing.finish()
    notes = viewing.notes

    collector_pub = public_key_b64(key)
    (folder / "keys" / "collector.pub").write_text(collector_pub + "\n", encoding="ascii")
    source_problems += _key_problems(cameras, keys)
    for agent_id, views in sorted(keys.history.items()):
        (folder / "keys" / "agents" / agent_id).mkdir(parents=True, exist_ok=True)
        for view in views:
            (folder / "keys" / "agents" / agent_id / f"{view.fingerprint}.pub").write_text(view.public_key + "\n",
                                                                                          encoding="ascii")
    exported = {"by": actor, "at": format_time(now), "at_local": local_iso(now), "reason": reason,
                "host": socket.gethostname(), "audit_entry": audit_seq,
                # the same document `exam-collector serve` publishes, so `verify-log --checkpoint` takes either
                "audit_checkpoint": audit.checkpoint_document(checkpoint)}
    coverage = report_json(report)
    coverage["gaps"] = gaps
    (folder / "coverage.json").write_text(json.dumps(coverage, ensure_ascii=False, indent=2, sort_keys=True) + "\n",
                                          encoding="utf-8")
    (folder / "coverage.html").write_text(coverage_html(report, gaps, exported, clips), encoding="utf-8")
    shutil.copyfile(VERIFIER_SOURCE, folder / "verify.py")
    (folder / "README.txt").write_text(PACKAGE_README, encoding="utf-8")

    listed = [folder / "coverage.json", folder / "coverage.html", folder / "verify.py", folder / "README.txt"]
    if (folder / "viewing").is_dir():
        listed += sorted(p for p in (folder / "viewing").iterdir() if p.is_file())
    parts = []
    for part in report.parts:
        parts.append({"part": part.part, "venue": part.venue, "room": part.room, "status": part.status,
                      "start": format_time(part.start), "end": format_time(part.end),
                      "start_local": local_iso(part.start), "end_local": local_iso(part.end),
                      "cameras": [c.camera for c in part.coverage.cameras]})
    package = {
        "format": PACKAGE_FORMAT, "v": PACKAGE_VERSION,
        "batch": {"id": report.batch_id, "institution": report.institution, "occupation": report.occupation,
                  "level": report.level, "status": report.status},
        "parts": parts,
        "cameras": camera_entries,
        "gaps": gaps,
        "coverage": coverage,
        "coverage_rule": {"gap_tolerance_seconds": settings.tolerance_seconds,
                          "pre_margin_minutes": settings.pre_margin_minutes,
                          "post_margin_minutes": settings.post_margin_minutes,
                          "disqualifying_health": sorted(DISQUALIFYING_HEALTH)},
        "viewing": [{"path": c.path, "start": format_time(c.start), "end": format_time(c.end),
                     "start_local": local_iso(c.start), "end_local": local_iso(c.end), "first_seq": c.first_seq,
                     "last_seq": c.last_seq} for c in clips],
        "exported": exported,
        "keys": {"collector": collector_pub,
                 "agents": {agent: keys.entries(agent) for agent in sorted(keys.history)}},
        "files": [_file_entry(folder, p) for p in listed],
        "notes": notes,
    }
    data = json.dumps(package, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")
    (folder / "package.json").write_bytes(data)
    (folder / "package.sig").write_text(sign(key, data) + "\n", encoding="ascii")
    result_path = folder
    if zip_path is not None:
        _zip(folder, zip_path)
        shutil.rmtree(folder)
        result_path = zip_path
    log.info("export of batch %s written to %s", batch_id, result_path)
    return ExportResult(batch_id, result_path, len(segments), total, tuple(gaps), tuple(clips),
                        tuple(source_problems), audit_seq, tuple(notes))


def _zip(folder: Path, zip_path: Path) -> None:
    """Stored, not deflated: video does not compress, and storing keeps the zip as fast as a copy."""
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
    os.replace(tmp, zip_path)


class ProgressBar:
    """A one-line progress bar of the copy on a stream (stderr); quiet redraws when it is not a terminal."""

    def __init__(self, stream: Any, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last = -1
        self._shown = False

    def update(self, done: int, total: int) -> None:
        percent = 100 if total == 0 else min(100, done * 100 // total)
        step = percent if self.tty else percent // 25 * 25   # non-terminals get 0/25/50/75/100 only
        if step == self._last:
            return
        self._last = step
        filled = self.width * percent // 100
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {percent:3d}%  "
                f"{done / 1048576:.1f}/{total / 1048576:.1f} MiB")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()
