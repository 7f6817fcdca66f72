"""Database schema: SQLAlchemy 2.0 typed models. Alembic revisions in `collector/migrations` create it."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (BigInteger, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text,
                        UniqueConstraint)
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
    __tablename__ = "agent"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    venue: Mapped[str] = mapped_column(String(64))
    institution: Mapped[str | None] = mapped_column(String(64))
    public_key: Mapped[str] = mapped_column(String(64))
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime())


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
