"""Answers an agent's question "where do my cameras' chains end?" (a venue machine replaced or its journal
lost). The agent continues each chain after the collector's newest record of the camera instead of starting
again at seq 1, which the collector would reject as replayed; the answer is recorded in the audit log, and
the outage between the old machine's last record and the new one's first is stated by the new agent as a gap.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.protocol import ChainHead, ChainHeads, ChainRequest

from . import audit
from .models import EVENT_CHAIN_HEADS, Agent, IngestEvent, SegmentRecord

log = logging.getLogger(__name__)

MIN_SECONDS_BETWEEN_ANSWERS = 2.0   # per agent: a flood of questions costs one query round and entry each


class ChainResponder:
    """Looks up chain heads for enrolled agents; at most one answer per agent every couple of seconds."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}

    def answer(self, agent: str, request: ChainRequest, now: datetime) -> ChainHeads | None:
        """The heads of the request's cameras in the agent's enrolled venue; None for an unknown agent or a
        question asked again too soon (the agent asks again after a few seconds)."""
        with self._lock:
            moment = time.monotonic()
            if moment - self._last.get(agent, -1e9) < MIN_SECONDS_BETWEEN_ANSWERS:
                return None
            self._last[agent] = moment
            if len(self._last) > 10_000:
                self._last.pop(next(iter(self._last)))
        with self.sessions.begin() as session:
            enrolled = session.get(Agent, agent)
            if enrolled is None:
                log.warning("chain request from agent %s, which is not enrolled; not answered", agent)
                return None
            heads: dict[str, ChainHead | None] = {}
            for camera in request.cameras:
                row = session.execute(select(SegmentRecord.seq, SegmentRecord.record_hash, SegmentRecord.end_at)
                                      .where(SegmentRecord.venue == enrolled.venue, SegmentRecord.camera == camera)
                                      .order_by(SegmentRecord.seq.desc()).limit(1)).first()
                heads[camera] = ChainHead(row.seq, row.record_hash, row.end_at) if row else None
            known = {camera: head.seq for camera, head in heads.items() if head is not None}
            if known:
                detail = ", ".join(f"{camera} after seq {seq}" for camera, seq in sorted(known.items()))
                session.add(IngestEvent(at=now, agent_id=agent, venue=enrolled.venue, event=EVENT_CHAIN_HEADS,
                                        reason=None, detail=f"agent with a new journal continues {detail}"))
                audit.record(session, audit.ACTION_CHAIN_HEADS, actor=f"agent:{agent}", target=agent,
                             detail={"venue": enrolled.venue, "heads": {c: {"seq": h.seq, "record": h.record}
                                                                        for c, h in heads.items() if h}})
                log.warning("agent %s started a new journal: told it where %s chain(s) end (%s)", agent,
                            len(known), detail)
        return ChainHeads(request.nonce, heads, now)
