"""object storage: the object version behind each stored segment and the storage's own lock date

Revision ID: 0008_object_storage
Revises: 0007_trust
Create Date: 2026-12-01

`segment_record.storage_version` names the S3 object version that holds a segment's bytes (NULL for footage on
the filesystem), `segment_record.lock_until` the date until which the storage refuses to delete that version
(NULL: no storage lock). Existing rows are footage on the filesystem: both stay NULL.
"""

from alembic import op
import sqlalchemy as sa

revision = "0008_object_storage"
down_revision = "0007_trust"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("segment_record") as batch:
        batch.add_column(sa.Column("storage_version", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("lock_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("segment_record") as batch:
        batch.drop_column("lock_until")
        batch.drop_column("storage_version")
