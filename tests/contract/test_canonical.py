"""canonical_bytes follows docs/protocol.md's formula exactly; the time format round-trips."""

import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest

from exam_contract.canonical import canonical_bytes, format_time, parse_time, sha256_hex, truncate_to_millis


def test_canonical_bytes_sorted_keys_no_spaces():
    assert canonical_bytes({"b": 1, "a": [1, 2], "c": {"z": None, "y": True}}) == \
        b'{"a":[1,2],"b":1,"c":{"y":true,"z":null}}'


def test_canonical_bytes_keeps_chinese_as_utf8_not_escapes():
    data = canonical_bytes({"room_kind_zh": "理论知识考场", "note": "操作技能考场"})
    assert data == '{"note":"操作技能考场","room_kind_zh":"理论知识考场"}'.encode("utf-8")
    assert b"\\u" not in data


def test_canonical_bytes_equals_product_formula():
    obj = {"v": 1, "kind": "segment", "room": "T101", "说明": "第一考场", "duration": 10.0, "prev": None}
    expected = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert canonical_bytes(obj) == expected


def test_canonical_bytes_ignores_insertion_order():
    assert canonical_bytes({"a": 1, "b": 2}) == canonical_bytes({"b": 2, "a": 1})


def test_sha256_hex_is_lowercase_hex():
    digest = sha256_hex(b"abc")
    assert digest == hashlib.sha256(b"abc").hexdigest()
    assert digest == digest.lower() and len(digest) == 64


def test_format_time_utc_with_millis():
    moment = datetime(2026, 11, 26, 17, 22, 6, 120999, tzinfo=timezone.utc)
    assert format_time(moment) == "2026-11-26T17:22:06.120Z"


def test_format_time_converts_other_zones_to_utc():
    shanghai = timezone(timedelta(hours=8))
    assert format_time(datetime(2026, 11, 27, 1, 22, 6, 5000, tzinfo=shanghai)) == "2026-11-26T17:22:06.005Z"


def test_format_time_refuses_naive_datetime():
    with pytest.raises(ValueError, match="naive"):
        format_time(datetime(2026, 11, 26, 17, 22, 6))


@pytest.mark.parametrize("text", ["2026-11-26T17:22:06.000Z", "2026-11-26T17:22:06.120Z",
                                  "2026-01-01T00:00:00.999Z", "2024-02-29T23:59:59.001Z"])
def test_time_round_trip_from_text(text):
    parsed = parse_time(text)
    assert parsed.tzinfo is not None and parsed.utcoffset() == timedelta(0)
    assert format_time(parsed) == text


def test_time_round_trip_from_datetime_keeps_millis():
    moment = datetime(2026, 11, 26, 17, 22, 6, 123456, tzinfo=timezone.utc)
    assert parse_time(format_time(moment)) == truncate_to_millis(moment)
    assert parse_time(format_time(moment)).microsecond == 123000


@pytest.mark.parametrize("text", [
    "2026-11-26T17:22:06Z",           # no millis
    "2026-11-26T17:22:06.12Z",        # two digits
    "2026-11-26T17:22:06.120",        # no Z
    "2026-11-26T17:22:06.120+00:00",  # offset instead of Z
    "2026-11-26 17:22:06.120Z",       # space separator
    "2026-13-26T17:22:06.120Z",       # month 13
    "2026-11-26T17:22:06.abcZ",       # millis not digits
    "",
])
def test_parse_time_refuses_other_forms_naming_the_format(text):
    with pytest.raises(ValueError, match="YYYY-MM-DDTHH:MM:SS.mmmZ"):
        parse_time(text)


def test_parse_time_refuses_non_string():
    with pytest.raises(ValueError):
        parse_time(1764177726)  # type: ignore[arg-type]



@pytest.mark.parametrize("text", ["2026-11-26T17:22:06.+12Z", "2026-11-26T17:22:06.1_2Z",
                                  "2026-11-26T17:22:06. 12Z"])
def test_parse_time_refuses_non_digit_millis(text):
    with pytest.raises(ValueError):
        parse_time(text)
