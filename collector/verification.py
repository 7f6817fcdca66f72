"""Whether an upload may be staged and stored: an init checked against its topic, enrolment, signature and
admission limits (collector/admission.py) before anything is staged; a finished record judged against its chain.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from exam_contract import protocol as P
from exam_contract.canonical import canonical_bytes, format_time, sha256_hex
from exam_contract.chain import ChainPosition, LinkVerdict, judge_link
from exam_contract.identifiers import is_file_id, is_identifier
from exam_contract.manifest import Manifest, ManifestError
from exam_contract.protocol import InitMessage, ProtocolError
from exam_contract.signing import PublicKeyError, key_fingerprint, parse_public_key, verify

from .admission import IngestLimits, Refusal, check_init_shape, check_plausible
from .models import Agent, SegmentRecord


@dataclass(frozen=True)
class Staged:
    """A parsed init whose sender, signature and limits are checked."""

    message: InitMessage
    manifest: Manifest
    record_hash: str
    key_fingerprint: str       # the enrolled key that verified the signature
    institution: str           # the enrolled institution (equal to the manifest's, or it was refused)


@dataclass(frozen=True)
class ChainJudgement:
    verdict: LinkVerdict            # FIRST, LINKED or HOLE (BROKEN is refused)
    missing_seqs: list[int]         # the seqs of the hole below, for its event
    successor: int | None           # id of the stored seq + 1, which this record may link


def topic_ids_ok(agent: str, file_id: str) -> bool:
    return is_identifier(agent) and is_file_id(file_id)


def stored_record(session: Session, venue: str, camera: str, seq: int) -> SegmentRecord | None:
    return session.scalars(select(SegmentRecord).where(
        SegmentRecord.venue == venue, SegmentRecord.camera == camera, SegmentRecord.seq == seq)).first()


def stored_record_of_file(sessions: sessionmaker[Session], agent: str, file_id: str) -> SegmentRecord | None:
    with sessions() as session:
        return session.scalars(select(SegmentRecord).where(
            SegmentRecord.agent_id == agent, SegmentRecord.file_id == file_id)).first()


def check_init(sessions: sessionmaker[Session], agent: str, file_id: str, payload: bytes,
               limits: IngestLimits) -> Staged:
    """Parse and weigh an init: shape and limits first (cheap, no allocation proportional to its claims),
    then the enrolment it must match, the signature, and whether the record is plausible at all."""
    try:
        message = InitMessage.decode(payload)
    except ProtocolError as exc:
        raise Refusal(P.REJECT_MALFORMED, str(exc)) from exc
    try:
        manifest = message.manifest()
    except ManifestError as exc:
        raise Refusal(P.REJECT_MALFORMED, str(exc)) from exc
    if manifest.file_id != file_id:
        raise Refusal(P.REJECT_MALFORMED, f"topic file_id {file_id!r} is not the manifest's "
                                          f"camera-seq {manifest.file_id!r}")
    check_init_shape(message, manifest, limits)
    try:
        message.check_chunk_count(manifest)
    except ProtocolError as exc:
        raise Refusal(P.REJECT_WRONG_CHUNK_COUNT, str(exc)) from exc
    with sessions() as session:
        enrolled = session.get(Agent, agent)
    if enrolled is None:
        raise Refusal(P.REJECT_UNKNOWN_AGENT, f"agent {agent!r} is not enrolled: enrol it with "
                                              "`exam-collector enroll`")
    if enrolled.revoked_at is not None:
        # The operator's reason stays on the collector (`exam-collector agents`): the machine may be in other hands.
        raise Refusal(P.REJECT_AGENT_REVOKED, f"agent {agent!r} was revoked at {format_time(enrolled.revoked_at)}: "
                                              "no upload is accepted until an operator reinstates it with "
                                              "`exam-collector enroll ... --reinstate`")
    if manifest.venue != enrolled.venue:
        raise Refusal(P.REJECT_VENUE_MISMATCH, f"agent {agent!r} is enrolled for venue "
                                               f"{enrolled.venue!r}, manifest says {manifest.venue!r}")
    if enrolled.institution is None:
        raise Refusal(P.REJECT_INSTITUTION_MISMATCH, f"agent {agent!r} is enrolled without an institution: "
                                                     f"set it with `exam-collector enroll --agent {agent} "
                                                     "--institution CODE`")
    if manifest.institution != enrolled.institution:
        raise Refusal(P.REJECT_INSTITUTION_MISMATCH, f"agent {agent!r} is enrolled for institution "
                                                     f"{enrolled.institution!r}, manifest says "
                                                     f"{manifest.institution!r}")
    if manifest.agent != agent:
        raise Refusal(P.REJECT_AGENT_MISMATCH, f"topic agent {agent!r} is not manifest agent "
                                               f"{manifest.agent!r}")
    try:
        public = parse_public_key(enrolled.public_key)
    except PublicKeyError as exc:
        raise Refusal(P.REJECT_BAD_SIGNATURE, f"enrolled key of {agent!r} unusable: {exc}") from exc
    canonical = canonical_bytes(message.manifest_raw)
    if not verify(public, canonical, message.signature):
        raise Refusal(P.REJECT_BAD_SIGNATURE, f"signature does not verify with the key enrolled "
                                              f"for {agent!r}")
    check_plausible(manifest, limits)
    return Staged(message, manifest, sha256_hex(canonical), key_fingerprint(public), enrolled.institution)


def manifest_and_hash(payload: bytes) -> tuple[Manifest | None, str | None]:
    """What a refused init names, as far as it can be read: its manifest and record hash (None when not)."""
    try:
        message = InitMessage.decode(payload)
    except ProtocolError:
        return None, None
    record = sha256_hex(canonical_bytes(message.manifest_raw))
    try:
        return message.manifest(), record
    except ManifestError:
        return None, record


def lock_camera_chain(session: Session, venue: str, camera: str) -> None:
    """On PostgreSQL, hold the camera's chain lock until the session's transaction ends, so that two records of
    one camera are never written and judged at the same time (their transactions would not see each other's
    rows). SQLite needs none: its write lock, taken by the transaction's first write, serialises writers, and
    pysqlite begins the transaction only then, so reads after that write see every committed neighbour."""
    if session.get_bind().dialect.name != "postgresql":
        return
    key = int.from_bytes(hashlib.sha256(f"chain\0{venue}\0{camera}".encode()).digest()[:8], "big", signed=True)
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def judge_chain(session: Session, staged: Staged) -> ChainJudgement:
    """Where the record stands in its camera's chain; `Refusal` (chain_broken) when it contradicts a stored
    neighbour."""
    manifest = staged.manifest
    predecessor = stored_record(session, manifest.venue, manifest.camera, manifest.seq - 1) \
        if manifest.seq > 1 else None
    verdict = judge_link(ChainPosition(manifest.seq, manifest.prev),
                         predecessor.record_hash if predecessor else None)
    if verdict == LinkVerdict.BROKEN:
        raise Refusal(P.REJECT_CHAIN_BROKEN, f"prev {manifest.prev} is not the hash of stored seq "
                                             f"{manifest.seq - 1}")
    successor = stored_record(session, manifest.venue, manifest.camera, manifest.seq + 1)
    if successor is not None and successor.prev_hash != staged.record_hash:
        raise Refusal(P.REJECT_CHAIN_BROKEN, f"stored seq {manifest.seq + 1} names a different "
                                             f"predecessor ({successor.prev_hash})")
    missing: list[int] = []
    if verdict == LinkVerdict.HOLE:
        below = session.scalar(select(func.max(SegmentRecord.seq)).where(
            SegmentRecord.venue == manifest.venue, SegmentRecord.camera == manifest.camera,
            SegmentRecord.seq < manifest.seq))
        missing = list(range((below or 0) + 1, manifest.seq))
    return ChainJudgement(verdict, missing, successor.id if successor is not None else None)


def ranges_text(seqs: list[int]) -> str:
    if not seqs:
        return "?"
    return str(seqs[0]) if len(seqs) == 1 else f"{seqs[0]}-{seqs[-1]}"
