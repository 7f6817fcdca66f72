"""chunk receipts: chunk_transfer, chunk_receipt (issue 3, store-and-forward)

Revision ID: 0004_receipts
Revises: 0003_audit
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa

revision = "0004_receipts"
down_revision = "0003_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chunk_transfer",
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("file_id", sa.String(160), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("init_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("agent_id", "file_id", name=op.f("pk_chunk_transfer")),
    )
    op.create_index("ix_chunk_transfer_updated_at", "chunk_transfer", ["updated_at"], unique=False)
    op.create_table(
        "chunk_receipt",
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("file_id", sa.String(160), nullable=False),
        sa.Column("idx", sa.Integer(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint("agent_id", "file_id", "idx", name=op.f("pk_chunk_receipt")),
    )


def downgrade() -> None:
    op.drop_table("chunk_receipt")
    op.drop_index("ix_chunk_transfer_updated_at", table_name="chunk_transfer")
    op.drop_table("chunk_transfer")
