"""agent revocation: when, by whom and why an agent was revoked (`exam-collector enroll --revoke`)

Revision ID: 0009_agent_revocation
Revises: 0008_object_storage
Create Date: 2026-12-01

`agent.revoked_at` set: every new upload of the agent is rejected `agent_revoked`; its stored footage and key
history stay. NULL (every existing agent): enrolled as before.
"""

from alembic import op
import sqlalchemy as sa

revision = "0009_agent_revocation"
down_revision = "0008_object_storage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agent") as batch:
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("revoked_by", sa.String(160), nullable=True))
        batch.add_column(sa.Column("revoked_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agent") as batch:
        batch.drop_column("revoked_reason")
        batch.drop_column("revoked_by")
        batch.drop_column("revoked_at")
