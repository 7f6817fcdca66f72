"""portal users and sessions: portal_user, portal_session (issue 6, HTTP API and web portal)

Revision ID: 0005_users
Revises: 0004_receipts
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa

revision = "0005_users"
down_revision = "0004_receipts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "portal_user",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("institutions", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_portal_user")),
        sa.UniqueConstraint("username", name=op.f("uq_portal_user_username")),
    )
    op.create_table(
        "portal_session",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["portal_user.id"],
                                name=op.f("fk_portal_session_user_id_portal_user")),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_portal_session")),
    )
    op.create_index(op.f("ix_portal_session_user_id"), "portal_session", ["user_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_portal_session_user_id"), table_name="portal_session")
    op.drop_table("portal_session")
    op.drop_table("portal_user")
