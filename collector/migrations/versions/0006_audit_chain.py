"""audit checkpoints chained to each other (each signs the previous checkpoint's hash)

Revision ID: 0006_audit_chain
Revises: 0005_users
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

revision = "0006_audit_chain"
down_revision = "0005_users"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing checkpoints were signed with the version-1 layout (no prev hash, no host): they become
    # version 1 and keep verifying; the first version-2 checkpoint chains to the newest of them.
    with op.batch_alter_table("audit_checkpoint") as batch:
        batch.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default=sa.text("1")))
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("host", sa.String(256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_checkpoint") as batch:
        batch.drop_column("host")
        batch.drop_column("prev_hash")
        batch.drop_column("version")
