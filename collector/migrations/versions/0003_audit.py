"""audit log (hash-chained entries, head row, signed checkpoints), legal holds, scrub runs, segment deletion marks

Revision ID: 0003_audit
Revises: 0002_batches
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa

revision = "0003_audit"
down_revision = "0002_batches"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("segment_record", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("segment_record", sa.Column("deleted_entry", sa.BigInteger(), nullable=True))
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    # Every append locks this row; it exists from the start so two first appends cannot both insert it.
    op.bulk_insert(head, [{"id": 1, "seq": 0, "head_hash": None}])
    op.create_table(
        "audit_entry",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=True),
        sa.Column("entry_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_entry")),
        sa.UniqueConstraint("seq", name=op.f("uq_audit_entry_seq")),
    )
    op.create_index("ix_audit_entry_action_target", "audit_entry", ["action", "target"], unique=False)
    op.create_table(
        "audit_checkpoint",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("entry_count", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=True),
        sa.Column("occasion", sa.String(32), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_checkpoint")),
    )
    op.create_table(
        "legal_hold",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("batch_id", sa.String(128), nullable=True),
        sa.Column("venue", sa.String(64), nullable=True),
        sa.Column("camera", sa.String(128), nullable=True),
        sa.Column("from_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("to_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("case_ref", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_by", sa.String(256), nullable=True),
        sa.Column("release_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_legal_hold")),
    )
    op.create_table(
        "scrub_run",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sample", sa.Float(), nullable=False),
        sa.Column("files_checked", sa.Integer(), nullable=False),
        sa.Column("bytes_checked", sa.BigInteger(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("problem_count", sa.Integer(), nullable=False),
        sa.Column("problems", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scrub_run")),
    )


def downgrade() -> None:
    op.drop_table("scrub_run")
    op.drop_table("legal_hold")
    op.drop_table("audit_checkpoint")
    op.drop_index("ix_audit_entry_action_target", table_name="audit_entry")
    op.drop_table("audit_entry")
    op.drop_table("audit_head")
    with op.batch_alter_table("segment_record") as batch:
        batch.drop_column("deleted_entry")
        batch.drop_column("deleted_at")
