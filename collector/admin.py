"""Operator actions on the database and storage: enrolment, summary, integrity verification, events."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import format_time, sha256_hex
from exam_contract.identifiers import IDENTIFIER_RULE, is_identifier
from exam_contract.signing import PublicKeyError, key_fingerprint, parse_public_key, public_key_b64, verify

from .footage_store import FootageStore, StoredFileMissing, UnsafePath
from .ingest import utcnow
from .models import EVENT_ENROLLED, Agent, AgentKey, IngestEvent, SegmentRecord

log = logging.getLogger(__name__)


class EnrollError(ValueError):
    """Enrolment refused; the message says why and what to do."""


def enroll(sessions: sessionmaker[Session], agent: str, venue: str, pubkey: str,
           institution: str | None = None, replace: bool = False, reinstate: bool = False) -> str:
    """Enrol (or re-enrol with `replace`) an agent; returns a one-line description of what happened.

    A revoked agent (collector/revocation.py) is enrolled again only with `reinstate`, which clears the
    revocation (audit entry `agent.enroll` with `reinstated`); without it the enrolment is refused.

    A new enrolment needs the institution. An enrolment made before institutions were required gets one by
    enrolling again with the same key and venue and `institution` (no `replace` needed). A replaced key is
    retired, not forgotten: it stays in `agent_key` with its validity, so what it signed still verifies."""
    for value, option in ((agent, "--agent"), (venue, "--venue")):
        if not is_identifier(value):
            raise EnrollError(f"{option} {value!r} is not a usable id: use {IDENTIFIER_RULE}")
    if institution is not None and not is_identifier(institution):
        raise EnrollError(f"--institution {institution!r} is not a usable institution code (机构代码): use "
                          f"{IDENTIFIER_RULE}, e.g. JL2201001")
    try:
        key = public_key_b64(parse_public_key(pubkey))
    except PublicKeyError as exc:
        raise EnrollError(f"--pubkey: {exc}; pass the line `exam-edge pubkey` prints") from exc
    fingerprint = key_fingerprint(key)
    with sessions.begin() as session:
        row = session.get(Agent, agent)
        now = utcnow()
        retired: str | None = None
        wanted = institution if institution is not None else (row.institution if row is not None else None)
        if wanted is not None:
            # A venue (备案场所) is filed by one institution: footage, playback and exports are authorized by the
            # enrolled institution, so two institutions' agents in one venue would show one's footage to the other.
            other = session.scalars(select(Agent).where(Agent.venue == venue, Agent.id != agent,
                                                        Agent.institution.is_not(None),
                                                        Agent.institution != wanted).limit(1)).first()
            if other is not None:
                raise EnrollError(f"venue {venue} belongs to institution {other.institution} (agent {other.id} is "
                                  f"enrolled there), not {wanted}: check --venue and --institution")
        reinstated = None
        if reinstate:
            if row is None or row.revoked_at is None:
                raise EnrollError(f"agent {agent} is not revoked: leave out --reinstate")
            reinstated = format_time(row.revoked_at)
            row.revoked_at = row.revoked_by = row.revoked_reason = None
        elif row is not None and row.revoked_at is not None:
            raise EnrollError(f"agent {agent} was revoked at {format_time(row.revoked_at)} by {row.revoked_by}"
                              + (f" ({row.revoked_reason})" if row.revoked_reason else "")
                              + ": add --reinstate to accept its uploads again")
        if row is None:
            if institution is None:
                raise EnrollError(f"--institution is required to enrol agent {agent}: give its institution code "
                                  "(机构代码), e.g. JL2201001")
            row = Agent(id=agent, venue=venue, institution=institution, public_key=key, enrolled_at=now)
            session.add(row)
            session.flush()
            what = f"enrolled agent {agent} for venue {venue} of institution {institution}"
        else:
            same_key, same_venue = row.public_key == key, row.venue == venue
            fills_institution = row.institution is None and institution is not None
            same_institution = institution is None or row.institution == institution
            if same_key and same_venue and same_institution and not fills_institution and reinstated is None:
                _ensure_current_key(session, row, now)
                return f"agent {agent} is already enrolled for venue {venue} with this key; nothing changed"
            if same_key and same_venue and same_institution and not fills_institution:
                what = f"reinstated agent {agent} for venue {venue} (revoked at {reinstated})"
            elif same_key and same_venue and fills_institution:
                row.institution = institution
                what = f"agent {agent} now belongs to institution {institution}"
            elif not replace:
                changes = []
                if not same_key:
                    changes.append("a different key")
                if not same_venue:
                    changes.append(f"venue {venue} instead of {row.venue}")
                if not same_institution:
                    changes.append(f"institution {institution} instead of {row.institution}")
                raise EnrollError(f"agent {agent} is already enrolled; this enrolment has {' and '.join(changes)}: "
                                  "add --replace to re-enrol it")
            else:
                if not same_key:
                    retired = _retire_keys(session, row, now, f"replaced by key {fingerprint} (enroll --replace)")
                row.public_key, row.venue, row.enrolled_at = key, venue, now
                if institution is not None:
                    row.institution = institution
                what = f"re-enrolled agent {agent} for venue {venue} (replaced)"
            if reinstated is not None and not what.startswith("reinstated"):
                what += f"; reinstated (revoked at {reinstated})"
        _ensure_current_key(session, row, now)
        session.add(IngestEvent(at=now, agent_id=agent, venue=venue, event=EVENT_ENROLLED, reason=None,
                                detail=f"{what}; key {key} (SHA-256 {fingerprint})"))
        from . import audit

        audit.record(session, audit.ACTION_ENROLL, actor=audit.local_actor(), target=agent,
                     detail={"venue": venue, "institution": institution, "public_key": key,
                             "fingerprint": fingerprint, "replaced": replace, "retired_key": retired}
                     | ({"reinstated": reinstated} if reinstated is not None else {}))
    return what + (f"; key {retired[:16]}… retired, it still verifies what it signed" if retired else "")


def _retire_keys(session: Session, agent: Agent, now: datetime, reason: str) -> str | None:
    """Close the validity of the agent's open keys; returns the fingerprint of the one that was current."""
    _ensure_current_key(session, agent, now)
    current = None
    for old in session.scalars(select(AgentKey).where(AgentKey.agent_id == agent.id, AgentKey.valid_to.is_(None))):
        old.valid_to, old.retired_reason = now, reason
        current = old.fingerprint
    return current


def _ensure_current_key(session: Session, agent: Agent, now: datetime) -> None:
    """The agent's current key has an open `agent_key` row (enrolments written before key history have none)."""
    fingerprint = key_fingerprint(agent.public_key)
    found = session.scalars(select(AgentKey).where(AgentKey.agent_id == agent.id, AgentKey.fingerprint == fingerprint,
                                                   AgentKey.valid_to.is_(None))).first()
    if found is None:
        session.add(AgentKey(agent_id=agent.id, public_key=agent.public_key, fingerprint=fingerprint,
                             valid_from=min(agent.enrolled_at, now)))
        session.flush()


@dataclass(frozen=True)
class KeyView:
    agent: str
    public_key: str
    fingerprint: str
    valid_from: datetime
    valid_to: datetime | None
    retired_reason: str | None


def agent_keys(session: Session, agents: Iterable[str] | None = None) -> list[KeyView]:
    """Every key of the given agents (all agents when None), oldest first."""
    query = select(AgentKey).order_by(AgentKey.agent_id, AgentKey.valid_from, AgentKey.id)
    if agents is not None:
        query = query.where(AgentKey.agent_id.in_(list(agents)))
    return [KeyView(k.agent_id, k.public_key, k.fingerprint, k.valid_from, k.valid_to, k.retired_reason)
            for k in session.scalars(query)]


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


_Query = TypeVar("_Query", bound=Select)  # any select of segment_record columns


@dataclass(frozen=True)
class FootageFilter:
    """Which stored records `summary` (and its --verify) looks at: one venue, one camera id, records ending at or
    after `since` (UTC). None: no limit."""

    venue: str | None = None
    camera: str | None = None
    since: datetime | None = None

    def apply(self, query: _Query) -> _Query:
        if self.venue is not None:
            query = query.where(SegmentRecord.venue == self.venue)
        if self.camera is not None:
            query = query.where(SegmentRecord.camera == self.camera)
        if self.since is not None:
            query = query.where(SegmentRecord.end_at >= self.since)
        return query


EVERYTHING = FootageFilter()


def summarize(sessions: sessionmaker[Session], only: FootageFilter = EVERYTHING) -> list[CameraSummary]:
    """Per camera; with `only.since` chain holes are counted from the first seq since then, not from seq 1."""
    with sessions() as session:
        rows = session.execute(only.apply(select(
            SegmentRecord.venue, SegmentRecord.camera, SegmentRecord.institution, SegmentRecord.room,
            SegmentRecord.room_kind, SegmentRecord.kind, SegmentRecord.seq, SegmentRecord.duration,
            SegmentRecord.start_at, SegmentRecord.end_at)).order_by(
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
        lowest = min(seqs[key]) if only.since is not None else 1
        item.missing_seqs = [s for s in range(lowest, item.highest_seq + 1) if s not in seqs[key]]
        item.chain_holes = len(item.missing_seqs)
        item.seconds_covered = round(item.seconds_covered, 3)
    return list(out.values())


@dataclass(frozen=True)
class Problem:
    venue: str
    camera: str
    seq: int | None
    what: str


def verify_all(sessions: sessionmaker[Session], store: FootageStore, only: FootageFilter = EVERYTHING) -> list[Problem]:
    """Re-hash every stored file, re-verify every signature with the key that verified it at ingest (the
    agent's key history), re-walk every chain; `only` limits it to a subset (its chains are walked within it)."""
    problems: list[Problem] = []
    with sessions() as session:
        current = {a.id: a.public_key for a in session.scalars(select(Agent))}
        keys = {(k.agent, k.fingerprint): k.public_key for k in agent_keys(session)}
        records = session.scalars(only.apply(select(SegmentRecord)).order_by(
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
        key_text = (keys.get((rec.agent_id, rec.key_fingerprint)) if rec.key_fingerprint
                    else current.get(rec.agent_id))
        if key_text is None:
            bad(f"the key {rec.key_fingerprint or '(current)'} of agent {rec.agent_id} is not in the key history")
        elif not verify(parse_public_key(key_text), canonical, rec.signature):
            bad(f"signature does not verify with key {key_fingerprint(key_text)[:16]}… of {rec.agent_id}")
        if rec.deleted_at is not None:
            pass  # deleted by retention after its keep; its tombstone is in the audit log
        elif rec.kind == "segment" and rec.storage_path:
            try:
                digest, size = store.hash(rec.storage_path, rec.storage_version)
            except UnsafePath as exc:
                bad(str(exc))
            except StoredFileMissing:
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
        if (same_camera and previous is not None and previous.seq == rec.seq - 1
                and rec.prev_hash != previous.record_hash):
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
