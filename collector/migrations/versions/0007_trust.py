"""trust: agent key history, the key and collector behind each record, suspect clocks, rejected record hashes

Revision ID: 0007_trust
Revises: 0006_audit_chain
Create Date: 2026-12-01

Existing data: every agent's current key becomes its first `agent_key` row (valid from its enrolment), and
every stored record is attributed to that key. An agent enrolled without an institution takes the one its
stored records agree on, if they name exactly one valid id; otherwise it stays empty and its uploads are
rejected (`institution_mismatch`) until `exam-collector enroll --agent ID --institution CODE` sets it.
Stored rows take the enrolled institution (a record could name another one before ingest compared them).
"""
import hashlib
import base64
import re

from alembic import op
import sqlalchemy as sa

revision = "0007_trust"
down_revision = "0006_audit_chain"
branch_labels = None
depends_on = None

_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _fingerprint(public_key: str) -> str | None:
    try:
        raw = base64.b64decode(public_key.strip(), validate=True)
    except ValueError:
        return None
    return hashlib.sha256(raw).hexdigest() if len(raw) == 32 else None


def upgrade() -> None:
    op.create_table(
        "agent_key",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["agent_id"], ["agent.id"], name=op.f("fk_agent_key_agent_id_agent")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_key")),
    )
    op.create_index("ix_agent_key_agent_fingerprint", "agent_key", ["agent_id", "fingerprint"], unique=False)
    with op.batch_alter_table("segment_record") as batch:
        batch.add_column(sa.Column("key_fingerprint", sa.String(64), nullable=True))
        batch.add_column(sa.Column("stored_by", sa.String(160), nullable=True))
        batch.add_column(sa.Column("clock_suspect", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("ingest_event") as batch:
        batch.add_column(sa.Column("record_hash", sa.String(64), nullable=True))

    conn = op.get_bind()
    agents = conn.execute(sa.text("select id, public_key, institution, enrolled_at from agent")).all()
    for agent_id, public_key, institution, enrolled_at in agents:
        fingerprint = _fingerprint(public_key)
        if fingerprint is None:
            continue
        conn.execute(sa.text("insert into agent_key (agent_id, public_key, fingerprint, valid_from) "
                             "values (:a, :k, :f, :t)"), {"a": agent_id, "k": public_key, "f": fingerprint,
                                                          "t": enrolled_at})
        conn.execute(sa.text("update segment_record set key_fingerprint = :f where agent_id = :a"),
                     {"f": fingerprint, "a": agent_id})
        if institution is None:
            named = conn.execute(sa.text("select distinct institution from segment_record where agent_id = :a"),
                                 {"a": agent_id}).scalars().all()
            if len(named) == 1 and named[0] and _IDENTIFIER.fullmatch(named[0]):
                conn.execute(sa.text("update agent set institution = :i where id = :a"),
                             {"i": named[0], "a": agent_id})
                institution = named[0]
        if institution is not None:
            conn.execute(sa.text("update segment_record set institution = :i where agent_id = :a"),
                         {"i": institution, "a": agent_id})


def downgrade() -> None:
    with op.batch_alter_table("ingest_event") as batch:
        batch.drop_column("record_hash")
    with op.batch_alter_table("segment_record") as batch:
        batch.drop_column("clock_suspect")
        batch.drop_column("stored_by")
        batch.drop_column("key_fingerprint")
    op.drop_index("ix_agent_key_agent_fingerprint", table_name="agent_key")
    op.drop_table("agent_key")
