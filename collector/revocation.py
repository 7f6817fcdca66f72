"""Revoking an enrolled agent (`exam-collector enroll --revoke AGENT`) and listing agents with their state.

A revoked agent keeps its enrolment row, key history and stored footage (all still listed and verifiable); every
new upload from it is rejected `agent_revoked` (collector/verification.py). Only `exam-collector enroll ...
--reinstate` accepts it again (collector/admin.py), so a re-enrolment cannot undo a revocation by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import format_time
from exam_contract.signing import key_fingerprint

from .audit_entries import ACTION_REVOKE, record as audit_record
from .models import EVENT_REVOKED, Agent, IngestEvent, SegmentRecord

MAX_REASON = 500
BROKER_PASSWD = "/etc/mosquitto/exam/passwd"


class RevokeError(ValueError):
    """The revocation is refused; the message says why and what to do."""


@dataclass(frozen=True)
class AgentView:
    id: str
    venue: str
    institution: str | None
    fingerprint: str
    enrolled_at: datetime
    records: int
    revoked_at: datetime | None
    revoked_by: str | None
    revoked_reason: str | None

    def state(self) -> str:
        if self.revoked_at is None:
            return "active"
        why = f": {self.revoked_reason}" if self.revoked_reason else ""
        return f"REVOKED {format_time(self.revoked_at)} by {self.revoked_by}{why}"

    def line(self) -> str:
        return (f"{self.id}  venue {self.venue}  institution {self.institution or '-'}  key {self.fingerprint[:16]}…  "
                f"enrolled {format_time(self.enrolled_at)}  {self.records} record(s)  {self.state()}")

    def to_json(self) -> dict[str, object]:
        def t(moment: datetime | None) -> str | None:
            return format_time(moment) if moment else None

        return {"agent": self.id, "venue": self.venue, "institution": self.institution,
                "fingerprint": self.fingerprint, "enrolled_at": t(self.enrolled_at), "records": self.records,
                "revoked": self.revoked_at is not None, "revoked_at": t(self.revoked_at),
                "revoked_by": self.revoked_by, "revoked_reason": self.revoked_reason}


def revoke_agent(sessions: sessionmaker[Session], agent: str, reason: str | None, actor: str,
                 now: datetime) -> str:
    """Mark `agent` revoked (event and audit entry); returns the line to print. Revoking a revoked agent changes
    nothing."""
    reason = reason.strip() if reason else None
    if reason is not None and len(reason) > MAX_REASON:
        raise RevokeError(f"--reason has {len(reason)} characters: keep it to {MAX_REASON}")
    with sessions.begin() as session:
        row = session.get(Agent, agent)
        if row is None:
            raise RevokeError(f"agent {agent} is not enrolled: see `exam-collector agents` for the enrolled ids")
        if row.revoked_at is not None:
            return f"agent {agent} is already revoked since {format_time(row.revoked_at)}; nothing changed"
        row.revoked_at, row.revoked_by, row.revoked_reason = now, actor, reason
        fingerprint = key_fingerprint(row.public_key)
        session.add(IngestEvent(at=now, agent_id=agent, venue=row.venue, event=EVENT_REVOKED, reason=None,
                                detail=f"agent {agent} revoked by {actor}" + (f": {reason}" if reason else "")))
        audit_record(session, ACTION_REVOKE, actor=actor, target=agent, reason=reason,
                     detail={"venue": row.venue, "institution": row.institution, "fingerprint": fingerprint})
    return (f"agent {agent} revoked: its uploads are rejected (agent_revoked) from now on; its stored footage is "
            f"kept; also delete its broker account (mosquitto_passwd -D {BROKER_PASSWD} {agent})")


def list_agents(session: Session, agents: list[str] | None = None) -> list[AgentView]:
    counts = dict(session.execute(select(SegmentRecord.agent_id, func.count()).group_by(SegmentRecord.agent_id)).all())
    query = select(Agent).order_by(Agent.id)
    if agents is not None:
        query = query.where(Agent.id.in_(agents))
    return [AgentView(a.id, a.venue, a.institution, key_fingerprint(a.public_key), a.enrolled_at,
                      int(counts.get(a.id, 0)), a.revoked_at, a.revoked_by, a.revoked_reason)
            for a in session.scalars(query)]
