"""judge_link: every verdict."""

import pytest

from exam_contract.chain import ChainPosition, LinkVerdict, judge_link

H1 = "a" * 64
H2 = "b" * 64


@pytest.mark.parametrize("record, predecessor, verdict", [
    (ChainPosition(1, None), None, LinkVerdict.FIRST),
    (ChainPosition(1, None), H1, LinkVerdict.FIRST),     # nothing precedes seq 1
    (ChainPosition(1, H1), None, LinkVerdict.BROKEN),    # seq 1 must not claim a predecessor
    (ChainPosition(2, H1), H1, LinkVerdict.LINKED),
    (ChainPosition(2, H1), H2, LinkVerdict.BROKEN),
    (ChainPosition(5, H1), None, LinkVerdict.HOLE),      # predecessor not yet known
    (ChainPosition(5, None), H1, LinkVerdict.BROKEN),    # seq > 1 with prev null against a known one
])
def test_judge_link(record, predecessor, verdict):
    assert judge_link(record, predecessor) is verdict


def test_verdict_values_are_stable_strings():
    assert {v.value for v in LinkVerdict} == {"linked", "first", "hole", "broken"}
