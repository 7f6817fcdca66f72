"""initial schema: agent, segment_record, ingest_event

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-26
"""
from alembic import op
import sqlalchemy as sa

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agent",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("venue", sa.String(64), nullable=False),
        sa.Column("institution", sa.String(64), nullable=True),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent")),
    )
    op.create_table(
        "segment_record",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("institution", sa.String(64), nullable=False),
        sa.Column("venue", sa.String(64), nullable=False),
        sa.Column("room", sa.String(64), nullable=False),
        sa.Column("room_kind", sa.String(16), nullable=False),
        sa.Column("camera", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("file_id", sa.String(160), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration", sa.Float(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("record_hash", sa.String(64), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=True),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("storage_path", sa.String(1024), nullable=True),
        sa.Column("chain_status", sa.String(16), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["agent_id"], ["agent.id"], name=op.f("fk_segment_record_agent_id_agent")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_segment_record")),
        sa.UniqueConstraint("venue", "camera", "seq", name=op.f("uq_segment_record_venue_camera_seq")),
    )
    op.create_index("ix_segment_record_camera_time", "segment_record",
                    ["venue", "camera", "start_at", "end_at"], unique=False)
    op.create_index("ix_segment_record_agent_file", "segment_record", ["agent_id", "file_id"], unique=False)
    op.create_table(
        "ingest_event",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=True),
        sa.Column("venue", sa.String(64), nullable=True),
        sa.Column("camera", sa.String(128), nullable=True),
        sa.Column("file_id", sa.String(160), nullable=True),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_event")),
    )
    op.create_index(op.f("ix_ingest_event_at"), "ingest_event", ["at"], unique=False)
    op.create_index("ix_ingest_event_agent_file", "ingest_event", ["agent_id", "file_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_ingest_event_agent_file", table_name="ingest_event")
    op.drop_index(op.f("ix_ingest_event_at"), table_name="ingest_event")
    op.drop_table("ingest_event")
    op.drop_index("ix_segment_record_agent_file", table_name="segment_record")
    op.drop_index("ix_segment_record_camera_time", table_name="segment_record")
    op.drop_table("segment_record")
    op.drop_table("agent")
