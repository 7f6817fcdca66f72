"""Database schema: SQLAlchemy 2.0 typed models. Alembic revisions in `collector/migrations` create it."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text,
                        UniqueConstraint, false, text)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

CHAIN_FIRST = "first"
CHAIN_LINKED = "linked"
CHAIN_HOLE = "hole"

EVENT_REJECTED = "rejected"
EVENT_CHAIN_HOLE = "chain_hole"
EVENT_CHAIN_LINKED = "chain_linked"
EVENT_DUPLICATE = "duplicate"
EVENT_HANDLER_ERROR = "handler_error"
EVENT_ENROLLED = "enrolled"
EVENT_REVOKED = "revoked"                  # `enroll --revoke`: the agent's uploads are refused from now on
EVENT_CLOCK_SUSPECT = "clock_suspect"      # stored, but the record's times are far from its receipt time
EVENT_CHUNK_DROPPED = "chunk_dropped"      # a chunk that could not belong to its file (throttled notes)
EVENT_KEY_REPLACED = "key_replaced"
EVENT_CHAIN_HEADS = "chain_heads"          # an agent without a journal was told where its chains end


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on PostgreSQL (timestamptz) and SQLite (naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database: attach tzinfo (UTC inside)")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Agent(Base):
    """An enrolled edge agent. `public_key` is its current key (the open row of `agent_key`); `institution`
    is None only for an enrolment made before institutions were required, and such an agent's uploads are
    rejected (`institution_mismatch`) until `exam-collector enroll --institution` sets it."""

    __tablename__ = "agent"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    venue: Mapped[str] = mapped_column(String(64))
    institution: Mapped[str | None] = mapped_column(String(64))
    public_key: Mapped[str] = mapped_column(String(64))
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Revocation (migration 0009_agent_revocation): `exam-collector enroll --revoke`. Set: every new upload is
    # rejected (`agent_revoked`) and its stored footage stays; `enroll ... --reinstate` clears it.
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_by: Mapped[str | None] = mapped_column(String(160))
    revoked_reason: Mapped[str | None] = mapped_column(Text)


class AgentKey(Base):
    """Every key an agent was ever enrolled with, and when it was valid. A record is verified with the key
    whose fingerprint it stores; `valid_to` is None for the current key and set when `enroll --replace`
    retires it (the key stays, so everything it signed still verifies)."""

    __tablename__ = "agent_key"
    __table_args__ = (Index("ix_agent_key_agent_fingerprint", "agent_id", "fingerprint"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(String(128), ForeignKey("agent.id"))
    public_key: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))   # SHA-256 hex of the raw 32 key bytes
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime())
    valid_to: Mapped[datetime | None] = mapped_column(UTCDateTime())
    retired_reason: Mapped[str | None] = mapped_column(Text)


class SegmentRecord(Base):
    """One stored record of a camera's chain: a segment (with a file) or a stated gap (no file)."""

    __tablename__ = "segment_record"
    __table_args__ = (
        UniqueConstraint("venue", "camera", "seq"),
        Index("ix_segment_record_camera_time", "venue", "camera", "start_at", "end_at"),
        Index("ix_segment_record_agent_file", "agent_id", "file_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(String(128), ForeignKey("agent.id"))
    institution: Mapped[str] = mapped_column(String(64))
    venue: Mapped[str] = mapped_column(String(64))
    room: Mapped[str] = mapped_column(String(64))
    room_kind: Mapped[str] = mapped_column(String(16))
    camera: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int] = mapped_column(BigInteger)
    file_id: Mapped[str] = mapped_column(String(160))
    kind: Mapped[str] = mapped_column(String(16))
    start_at: Mapped[datetime] = mapped_column(UTCDateTime())
    end_at: Mapped[datetime] = mapped_column(UTCDateTime())
    duration: Mapped[float] = mapped_column(Float)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    record_hash: Mapped[str] = mapped_column(String(64))
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    manifest: Mapped[str] = mapped_column(Text)          # canonical JSON exactly as signed
    signature: Mapped[str] = mapped_column(String(128))
    storage_path: Mapped[str | None] = mapped_column(String(1024))  # relative to storage_dir; None for gaps
    chain_status: Mapped[str] = mapped_column(String(16))  # first | linked | hole
    stored_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Retention (migration 0003_audit): set by `exam-retention enforce` after the file is unlinked; the row
    # itself is never erased. `deleted_entry` is the seq of the tombstone in the audit log.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    deleted_entry: Mapped[int | None] = mapped_column(BigInteger)
    # Trust (migration 0007_trust). The key that verified the signature (agent_key.fingerprint); the collector
    # instance that stored the row (`host.pid.suffix`, so a wrong clock can be traced to its machine); and
    # whether the record's own times were far from the collector's receipt time (an agent clock not to be
    # believed: its keep counts from stored_at, and coverage names `clock_suspect`).
    key_fingerprint: Mapped[str | None] = mapped_column(String(64))
    stored_by: Mapped[str | None] = mapped_column(String(160))
    clock_suspect: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Object storage (migration 0008_object_storage): the object version that holds the bytes (None on the
    # filesystem), and the date until which the storage itself refuses to delete it (its COMPLIANCE lock, as the
    # storage reported it; extended for batch links, never shortened).
    storage_version: Mapped[str | None] = mapped_column(String(1024))
    lock_until: Mapped[datetime | None] = mapped_column(UTCDateTime())


class IngestEvent(Base):
    """Everything notable on the ingest path: every rejection, chain holes and their closing, handler errors."""

    __tablename__ = "ingest_event"
    __table_args__ = (Index("ix_ingest_event_agent_file", "agent_id", "file_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    agent_id: Mapped[str | None] = mapped_column(String(128))  # as the topic named it; may be unenrolled
    venue: Mapped[str | None] = mapped_column(String(64))
    camera: Mapped[str | None] = mapped_column(String(128))
    file_id: Mapped[str | None] = mapped_column(String(160))
    seq: Mapped[int | None] = mapped_column(BigInteger)
    event: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    # The canonical manifest's SHA-256 when known (migration 0007_trust): a repeated `fin` is answered with a
    # rejection only when it asks about that same record.
    record_hash: Mapped[str | None] = mapped_column(String(64))


# ============================================================================ audit log, holds, scrub (issue 5)
# Migration 0003_audit. Written by collector/audit.py, collector/holds.py and retention/.

class AuditHead(Base):
    """The single row (id 1) every append locks: the newest entry's seq and hash."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[str | None] = mapped_column(String(64))


class AuditEntry(Base):
    """Append-only, hash-chained: `entry_hash` = SHA-256 of the canonical JSON of the fields and `prev_hash`."""

    __tablename__ = "audit_entry"
    __table_args__ = (Index("ix_audit_entry_action_target", "action", "target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(512))
    reason: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text)          # canonical JSON object
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """(entry count, head hash, time) signed with the collector key. Version 2 (migration 0006_audit_chain)
    also signs `prev_hash`, the SHA-256 of the previous checkpoint's signed bytes, and the signing `host`;
    rows written before that migration are version 1 and keep their original signed layout."""

    __tablename__ = "audit_checkpoint"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    entry_count: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[str | None] = mapped_column(String(64))
    occasion: Mapped[str] = mapped_column(String(32))    # startup|schedule|shutdown|command|retention|export
    public_key: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str | None] = mapped_column(String(256))


class LegalHold(Base):
    """A hold by batch, or by camera (within a venue) and time range; blocks deletion until released."""

    __tablename__ = "legal_hold"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[str | None] = mapped_column(String(128))
    venue: Mapped[str | None] = mapped_column(String(64))
    camera: Mapped[str | None] = mapped_column(String(128))
    from_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    to_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reason: Mapped[str] = mapped_column(Text)
    case_ref: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(256))
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    released_by: Mapped[str | None] = mapped_column(String(256))
    release_reason: Mapped[str | None] = mapped_column(Text)


class ScrubRun(Base):
    """One `exam-retention scrub`: what was checked and every problem found (JSON list)."""

    __tablename__ = "scrub_run"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sample: Mapped[float] = mapped_column(Float)
    files_checked: Mapped[int] = mapped_column(Integer)
    bytes_checked: Mapped[int] = mapped_column(BigInteger)
    seconds: Mapped[float] = mapped_column(Float)
    problem_count: Mapped[int] = mapped_column(Integer)
    problems: Mapped[str] = mapped_column(Text)
# ============================================================================ end of issue 5 section


# ============================================================================ chunk receipts (issue 3)
# Migration 0004_receipts. Written by collector/ingest.py; any collector instance sharing the database answers
# a repeated `fin` from these rows.

class ChunkTransfer(Base):
    """A file being reassembled in staging: created by its `init`, touched by each `fin`, removed after the
    store or when the staging TTL expires. Its row lock is the finishing claim among collector instances."""

    __tablename__ = "chunk_transfer"
    __table_args__ = (Index("ix_chunk_transfer_updated_at", "updated_at"),)

    agent_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    file_id: Mapped[str] = mapped_column(String(160), primary_key=True)
    chunks: Mapped[int] = mapped_column(Integer)
    chunk_size: Mapped[int] = mapped_column(Integer)
    init_sha256: Mapped[str] = mapped_column(String(64))  # of the init payload, to notice a changed init
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ChunkReceipt(Base):
    """Chunk `idx` of a staged file is on the storage volume and fsynced (written only after the bytes)."""

    __tablename__ = "chunk_receipt"

    agent_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    file_id: Mapped[str] = mapped_column(String(160), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


# ============================================================================ exam batches (issue 4)
# Migration 0002_batches. Written by collector/batches.py. Footage is linked to a part by query (venue, room
# and time overlap), not by a link table, so links never go stale whichever arrives first.

class ExamBatch(Base):
    """One exam batch (批次) as the exam-affairs system names it."""

    __tablename__ = "exam_batch"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    institution: Mapped[str] = mapped_column(String(64))
    occupation: Mapped[str] = mapped_column(String(128))
    level: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ExamBatchPart(Base):
    """A part (theory or practical) of a batch in one room, with its exam window in UTC."""

    __tablename__ = "exam_batch_part"
    __table_args__ = (
        UniqueConstraint("batch_id", "part", "room"),
        Index("ix_exam_batch_part_venue_room_time", "venue", "room", "start_at", "end_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(String(128), ForeignKey("exam_batch.id"))
    part: Mapped[str] = mapped_column(String(16))      # theory | practical
    venue: Mapped[str] = mapped_column(String(64))
    room: Mapped[str] = mapped_column(String(64))
    start_at: Mapped[datetime] = mapped_column(UTCDateTime())
    end_at: Mapped[datetime] = mapped_column(UTCDateTime())


class BatchImport(Base):
    """Every accepted import: who, from which file, and what it created or changed (JSON)."""

    __tablename__ = "batch_import"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer)
    changes: Mapped[str] = mapped_column(Text)


# The cameras of a room are found by skipping through this index (one seek per camera), which stays fast
# however many segments a room has.
Index("ix_segment_record_venue_room_camera", SegmentRecord.venue, SegmentRecord.room, SegmentRecord.camera)
# ============================================================================ end of issue 4 section


# ============================================================================ portal users and sessions (issue 6)
# Migration 0005_users. Written by collector/users.py (`exam-collector users add`, the HTTP API's login).

class PortalUser(Base):
    """An inspector or admin of the HTTP API and web portal; inspectors see only their institutions."""

    __tablename__ = "portal_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(128), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))   # scrypt$n$r$p$salt$hash
    role: Mapped[str] = mapped_column(String(16))             # inspector | admin
    institutions: Mapped[str] = mapped_column(Text)           # JSON list of institution codes
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class PortalSession(Base):
    """A login: only the SHA-256 of its bearer token is stored; it stops working at `expires_at`."""

    __tablename__ = "portal_session"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer, ForeignKey("portal_user.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
# ============================================================================ end of issue 6 section
