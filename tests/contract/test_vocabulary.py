"""The shared codes are `str` enums whose values are the wire, database and log spellings, unchanged."""

from __future__ import annotations

import json
import logging

import pytest

from exam_contract import exitcodes
from exam_contract import protocol as P
from exam_contract.alarms import AlarmCode
from exam_contract.manifest import GAP_CAUSES, GapCause
from exam_contract.protocol import REPLY_STATES, RejectionCode, ReplyState


def test_values_are_the_ones_on_the_wire() -> None:
    assert GAP_CAUSES == ("camera_unreachable", "recorder_crashed", "corrupt_segment", "disk_full", "agent_stopped")
    assert REPLY_STATES == ("stored", "missing", "rejected")
    assert [code.value for code in AlarmCode] == ["disk_full", "records_rejected", "storage_full", "storage_error",
                                                  "database_unreachable", "object_lock_failed", "object_locked"]
    assert P.REJECT_IMPLAUSIBLE is RejectionCode.IMPLAUSIBLE and P.REJECT_IMPLAUSIBLE == "implausible_record"
    assert P.REJECTION_CODES == tuple(RejectionCode) and "unknown_agent" in P.RETRYABLE_REJECTIONS


@pytest.mark.parametrize("member", [GapCause.DISK_FULL, ReplyState.STORED, RejectionCode.SEQ_REPLAYED,
                                    AlarmCode.DATABASE_UNREACHABLE])
def test_a_member_prints_and_serialises_as_its_value(member, caplog) -> None:
    value = member.value
    assert json.dumps({member: member}) == json.dumps({value: value})
    assert (str(member), f"{member}", "%s" % member, f"{member}: x") == (value, value, value, f"{value}: x")
    with caplog.at_level(logging.INFO):
        logging.getLogger("vocabulary").info("ALARM %s", member)
    assert caplog.messages == [f"ALARM {value}"]


def test_exit_codes() -> None:
    assert (exitcodes.OK, exitcodes.INPUT, exitcodes.UNREACHABLE, exitcodes.GAPS, exitcodes.INTEGRITY) == (0, 1, 2, 3, 4)
