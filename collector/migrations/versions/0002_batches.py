"""exam batches and their parts, the import log, and the room index on segment_record

Revision ID: 0002_batches
Revises: 0001_initial
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa

revision = "0002_batches"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "exam_batch",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("institution", sa.String(64), nullable=False),
        sa.Column("occupation", sa.String(128), nullable=False),
        sa.Column("level", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exam_batch")),
    )
    op.create_table(
        "exam_batch_part",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("batch_id", sa.String(128), nullable=False),
        sa.Column("part", sa.String(16), nullable=False),
        sa.Column("venue", sa.String(64), nullable=False),
        sa.Column("room", sa.String(64), nullable=False),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["exam_batch.id"], name=op.f("fk_exam_batch_part_batch_id_exam_batch")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exam_batch_part")),
        sa.UniqueConstraint("batch_id", "part", "room", name=op.f("uq_exam_batch_part_batch_id_part_room")),
    )
    op.create_index("ix_exam_batch_part_venue_room_time", "exam_batch_part",
                    ["venue", "room", "start_at", "end_at"], unique=False)
    op.create_table(
        "batch_import",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("changes", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_import")),
    )
    op.create_index(op.f("ix_batch_import_at"), "batch_import", ["at"], unique=False)
    op.create_index("ix_segment_record_venue_room_camera", "segment_record", ["venue", "room", "camera"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_segment_record_venue_room_camera", table_name="segment_record")
    op.drop_index(op.f("ix_batch_import_at"), table_name="batch_import")
    op.drop_table("batch_import")
    op.drop_index("ix_exam_batch_part_venue_room_time", table_name="exam_batch_part")
    op.drop_table("exam_batch_part")
    op.drop_table("exam_batch")
