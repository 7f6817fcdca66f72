"""MQTT topic names of protocol v1 (docs/protocol.md, Topics)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ROOT = "exam/v1"
COLLECTOR_SHARE_GROUP = "collectors"
COLLECTOR_SUBSCRIPTION = f"$share/{COLLECTOR_SHARE_GROUP}/{ROOT}/+/seg/#"
COLLECTOR_CHAIN_SUBSCRIPTION = f"$share/{COLLECTOR_SHARE_GROUP}/{ROOT}/+/chain/request"
AUDIT_CHECKPOINT_TOPIC = f"{ROOT}/audit/checkpoint"   # retained: the newest signed audit checkpoint
DEFAULT_MAX_PACKET_SIZE = 512 * 1024
DEFAULT_CHUNK_SIZE = 256 * 1024  # stays well under the broker's max packet size with headers


class TopicError(ValueError):
    """A topic is not one of protocol v1's segment topics."""


def init_topic(agent: str, file_id: str) -> str:
    return f"{ROOT}/{agent}/seg/{file_id}/init"


def chunk_topic(agent: str, file_id: str, index: int) -> str:
    return f"{ROOT}/{agent}/seg/{file_id}/chunk/{index}"


def fin_topic(agent: str, file_id: str) -> str:
    return f"{ROOT}/{agent}/seg/{file_id}/fin"


def reply_topic(agent: str) -> str:
    return f"{ROOT}/{agent}/reply"


def status_topic(agent: str) -> str:
    return f"{ROOT}/{agent}/status"


def chain_request_topic(agent: str) -> str:
    """Agent -> collectors: where do my cameras' chains end?"""
    return f"{ROOT}/{agent}/chain/request"


def chain_topic(agent: str) -> str:
    """Collector -> agent: the answer to a chain request."""
    return f"{ROOT}/{agent}/chain"


def schedule_topic(agent: str) -> str:
    """Collector -> agent, retained: the windows of the exam batches at the agent's venue (exam_contract.schedule)."""
    return f"{ROOT}/{agent}/schedule"


def parse_chain_request_topic(topic: str) -> str | None:
    """The agent id of a chain request topic, or None when the topic is not one."""
    parts = topic.split("/")
    if len(parts) == 5 and parts[:2] == ["exam", "v1"] and parts[3:] == ["chain", "request"] and parts[2]:
        return parts[2]
    return None


@dataclass(frozen=True)
class SegmentTopic:
    agent: str
    file_id: str
    part: Literal["init", "chunk", "fin"]
    chunk_index: int | None = None


def parse_segment_topic(topic: str) -> SegmentTopic:
    parts = topic.split("/")
    if len(parts) < 6 or parts[0] != "exam" or parts[1] != "v1" or parts[3] != "seg":
        raise TopicError(f"not a segment topic: {topic!r}")
    agent, file_id, part = parts[2], parts[4], parts[5]
    if not agent or not file_id:
        raise TopicError(f"empty agent or file id in {topic!r}")
    if part in ("init", "fin") and len(parts) == 6:
        return SegmentTopic(agent, file_id, part)  # type: ignore[arg-type]  # `in` does not narrow str to the Literal
    if part == "chunk" and len(parts) == 7 and parts[6].isascii() and parts[6].isdigit():
        return SegmentTopic(agent, file_id, "chunk", int(parts[6]))
    raise TopicError(f"unknown segment topic part in {topic!r}")
