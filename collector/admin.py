"""Operator actions on the database and storage: enrolment, summary, integrity verification, events."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import format_time, sha256_hex
from exam_contract.files import hash_file
from exam_contract.signing import PublicKeyError, parse_public_key, public_key_b64, verify

from .ingest import utcnow
from .models import EVENT_ENROLLED, Agent, IngestEvent, SegmentRecord

log = logging.getLogger(__name__)


class EnrollError(ValueError):
    """Enrolment refused; the message says why and what to do."""


def enroll(sessions: sessionmaker[Session], agent: str, venue: str, pubkey: str,
           institution: str | None = None, replace: bool = False) -> str:
    """Enrol (or re-enrol with `replace`) an agent; returns a one-line description of what happened."""
    if not agent.strip() or "/" in agent or "+" in agent or "#" in agent:
        raise EnrollError(f"--agent {agent!r} is not a usable agent id: use letters, digits, '-', '.', '_'")
    if not venue.strip():
        raise EnrollError("--venue is empty: give the venue code, e.g. JL2201001-01")
    try:
        key = public_key_b64(parse_public_key(pubkey))
    except PublicKeyError as exc:
        raise EnrollError(f"--pubkey: {exc}; pass the line `exam-edge pubkey` prints") from exc
    with sessions.begin() as session:
        row = session.get(Agent, agent)
        now = utcnow()
        if row is None:
            session.add(Agent(id=agent, venue=venue, institution=institution, public_key=key, enrolled_at=now))
            what = f"enrolled agent {agent} for venue {venue}"
        elif row.public_key == key and row.venue == venue and (institution is None or row.institution == institution):
            return f"agent {agent} is already enrolled for venue {venue} with this key; nothing changed"
        elif not replace:
            changes = []
            if row.public_key != key:
                changes.append("a different key")
            if row.venue != venue:
                changes.append(f"venue {venue} instead of {row.venue}")
            if institution is not None and row.institution != institution:
                changes.append(f"institution {institution} instead of {row.institution}")
            raise EnrollError(f"agent {agent} is already enrolled; this enrolment has {' and '.join(changes)}: "
                              "add --replace to re-enrol it")
        else:
            row.public_key, row.venue, row.enrolled_at = key, venue, now
            if institution is not None:
                row.institution = institution
            what = f"re-enrolled agent {agent} for venue {venue} (replaced)"
        session.add(IngestEvent(at=now, agent_id=agent, venue=venue, event=EVENT_ENROLLED, reason=None,
                                detail=f"{what}; key {key}"))
        from . import audit

        audit.record(session, audit.ACTION_ENROLL, actor=audit.local_actor(), target=agent,
                     detail={"venue": venue, "institution": institution, "public_key": key, "replaced": replace})
    return what


@dataclass
class CameraSummary:
    venue: str
    camera: str
    institution: str
    room: str
    room_kind: str
    segments: int = 0
    gap_records: int = 0
    seconds_covered: float = 0.0
    chain_holes: int = 0           # seq numbers missing between 1 and the highest stored seq
    missing_seqs: list[int] = field(default_factory=list)
    first_start: str | None = None
    last_end: str | None = None
    highest_seq: int = 0


def summarize(sessions: sessionmaker[Session]) -> list[CameraSummary]:
    with sessions() as session:
        rows = session.execute(select(
            SegmentRecord.venue, SegmentRecord.camera, SegmentRecord.institution, SegmentRecord.room,
            SegmentRecord.room_kind, SegmentRecord.kind, SegmentRecord.seq, SegmentRecord.duration,
            SegmentRecord.start_at, SegmentRecord.end_at).order_by(
            SegmentRecord.venue, SegmentRecord.camera, SegmentRecord.seq)).all()
    out: dict[tuple[str, str], CameraSummary] = {}
    seqs: dict[tuple[str, str], set[int]] = defaultdict(set)
    for r in rows:
        key = (r.venue, r.camera)
        item = out.get(key)
        if item is None:
            item = out[key] = CameraSummary(r.venue, r.camera, r.institution, r.room, r.room_kind)
        item.room, item.room_kind = r.room, r.room_kind
        if r.kind == "gap":
            item.gap_records += 1
        else:
            item.segments += 1
            item.seconds_covered += float(r.duration)
        seqs[key].add(r.seq)
        start, end = format_time(r.start_at), format_time(r.end_at)
        item.first_start = min(item.first_start or start, start)
        item.last_end = max(item.last_end or end, end)
        item.highest_seq = max(item.highest_seq, r.seq)
    for key, item in out.items():
        item.missing_seqs = [s for s in range(1, item.highest_seq + 1) if s not in seqs[key]]
        item.chain_holes = len(item.missing_seqs)
        item.seconds_covered = round(item.seconds_covered, 3)
    return list(out.values())


@dataclass(frozen=True)
class Problem:
    venue: str
    camera: str
    seq: int | None
    what: str


def verify_all(sessions: sessionmaker[Session], storage_dir: Path) -> list[Problem]:
    """Re-hash every stored file, re-verify every signature with the enrolled key, re-walk every chain."""
    problems: list[Problem] = []
    with sessions() as session:
        keys = {a.id: a.public_key for a in session.scalars(select(Agent))}
        records = session.scalars(select(SegmentRecord).order_by(
            SegmentRecord.venue, SegmentRecord.camera, SegmentRecord.seq)).all()
    previous: SegmentRecord | None = None
    for rec in records:
        def bad(what: str, rec: SegmentRecord = rec) -> None:
            problems.append(Problem(rec.venue, rec.camera, rec.seq, what))

        canonical = rec.manifest.encode("utf-8")
        if sha256_hex(canonical) != rec.record_hash:
            bad("stored manifest does not hash to its record hash")
        try:
            manifest = json.loads(rec.manifest)
        except ValueError:
            manifest = {}
            bad("stored manifest is not JSON")
        if (manifest.get("seq"), manifest.get("camera"), manifest.get("venue"), manifest.get("sha256")) != \
                (rec.seq, rec.camera, rec.venue, rec.sha256):
            bad("row fields differ from the signed manifest")
        key_text = keys.get(rec.agent_id)
        if key_text is None:
            bad(f"agent {rec.agent_id} is not enrolled")
        elif not verify(parse_public_key(key_text), canonical, rec.signature):
            bad(f"signature does not verify with the key enrolled for {rec.agent_id}")
        if rec.kind == "segment" and rec.storage_path:
            path = storage_dir / rec.storage_path
            try:
                digest, size = hash_file(path)
            except FileNotFoundError:
                bad(f"file {rec.storage_path} is missing")
            except OSError as exc:
                bad(f"file {rec.storage_path} unreadable: {exc.strerror or exc}")
            else:
                if size != rec.size:
                    bad(f"file {rec.storage_path} has {size} bytes, manifest says {rec.size}")
                elif digest != rec.sha256:
                    bad(f"file {rec.storage_path} hashes to {digest}, manifest says {rec.sha256}")
        elif rec.kind == "segment" and rec.size:
            bad("segment row has no stored file")
        same_camera = previous is not None and (previous.venue, previous.camera) == (rec.venue, rec.camera)
        if rec.seq == 1 and rec.prev_hash is not None:
            bad("seq 1 has a prev hash")
        if same_camera and previous is not None and previous.seq == rec.seq - 1 and rec.prev_hash != previous.record_hash:
            bad(f"chain broken: prev is not the hash of seq {previous.seq}")
        previous = rec
    return problems


def list_events(sessions: sessionmaker[Session], limit: int = 200) -> list[dict]:
    with sessions() as session:
        events = session.scalars(select(IngestEvent).order_by(IngestEvent.id.desc()).limit(limit)).all()
    return [{"at": format_time(e.at), "event": e.event, "reason": e.reason, "agent": e.agent_id,
             "venue": e.venue, "camera": e.camera, "file_id": e.file_id, "seq": e.seq, "detail": e.detail}
            for e in reversed(events)]


def summary_json(items: list[CameraSummary]) -> list[dict]:
    return [asdict(item) for item in items]
