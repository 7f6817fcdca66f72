"""Manifest to_dict/from_dict and every ManifestError, each naming its field."""

import json
from datetime import timedelta

import pytest

from exam_contract.canonical import canonical_bytes, sha256_hex
from exam_contract.manifest import GAP_CAUSES, Manifest, ManifestError, file_id_for, segment_file_name

from .factories import START, gap, segment

REQUIRED_FIELDS = {"v", "kind", "agent", "institution", "venue", "room", "room_kind", "camera", "seq",
                   "start", "end", "duration", "size", "sha256", "prev", "video", "clock", "health"}


def test_to_dict_has_every_product_field():
    data = segment().to_dict()
    assert REQUIRED_FIELDS <= set(data)
    assert data["start"] == "2026-11-26T01:30:00.120Z"
    assert data["end"] == "2026-11-26T01:30:10.120Z"
    assert data["video"] == {"codec": "h264", "width": 640, "height": 360, "fps": 25.0, "container": "mpegts"}
    assert data["clock"] == {"offset_ms": -3.5, "synced": True}
    assert data["prev"] is None and data["v"] == 1


@pytest.mark.parametrize("manifest", [segment(), segment(seq=7, prev="c" * 64), gap()],
                         ids=["first-segment", "later-segment", "gap"])
def test_round_trip(manifest):
    raw = json.loads(canonical_bytes(manifest.to_dict()))
    again = Manifest.from_dict(raw)
    assert again == manifest
    assert again.canonical() == manifest.canonical() == canonical_bytes(raw)
    assert again.record_hash() == manifest.record_hash() == sha256_hex(canonical_bytes(raw))


def test_round_trip_with_chinese_detail():
    record = gap(cause="disk_full")
    assert "连接超时".encode() in record.canonical()
    assert Manifest.from_dict(json.loads(record.canonical())) == record


def test_record_hash_is_sha256_of_canonical():
    record = segment()
    assert record.record_hash() == sha256_hex(canonical_bytes(record.to_dict()))


def test_unknown_extra_fields_are_tolerated():
    raw = segment().to_dict() | {"future_field": {"x": 1}}
    assert Manifest.from_dict(raw) == segment()


def test_file_id_and_segment_file_name():
    assert segment(seq=42, prev="a" * 64).file_id == "t101-cam1-42" == file_id_for("t101-cam1", 42)
    assert segment_file_name("t101-cam1", START) == "t101-cam1@20261126T013000.120Z.ts"
    assert segment_file_name("t101-cam1", START, "mp4").endswith(".mp4")


def test_naive_times_are_refused_on_output():
    with pytest.raises(ValueError, match="naive"):
        segment(start=START.replace(tzinfo=None)).to_dict()


def _raw(**changes):
    raw = segment(seq=2, prev="a" * 64).to_dict()
    for key, value in changes.items():
        if value is _DROP:
            raw.pop(key)
        else:
            raw[key] = value
    return raw


_DROP = object()


@pytest.mark.parametrize("changes, field", [
    ({"kind": "video"}, "kind"),
    ({"kind": _DROP}, "kind"),
    ({"room_kind": "lab"}, "room_kind"),
    ({"room_kind": 1}, "room_kind"),
    ({"seq": 0}, "seq"),
    ({"seq": "2"}, "seq"),
    ({"seq": True}, "seq"),
    ({"seq": _DROP}, "seq"),
    ({"start": "2026-11-26T01:30:00Z"}, "start"),
    ({"start": _DROP}, "start"),
    ({"end": "yesterday"}, "end"),
    ({"end": "2026-11-26T01:29:00.000Z"}, "end"),  # earlier than start
    ({"duration": "10"}, "duration"),
    ({"duration": _DROP}, "duration"),
    ({"size": -1}, "size"),
    ({"size": 1.5}, "size"),
    ({"size": False}, "size"),
    ({"sha256": "A" * 64}, "sha256"),           # uppercase hex
    ({"sha256": "a" * 63}, "sha256"),
    ({"sha256": None}, "sha256"),               # a segment needs its hash
    ({"prev": "xyz"}, "prev"),
    ({"prev": None}, "prev"),                   # seq > 1 with prev null
    ({"video": "h264"}, "video"),
    ({"video": {"codec": "h264", "width": 640}}, "video"),
    ({"video": {"codec": "h264", "width": "wide", "height": 360, "fps": 25}}, "video"),
    ({"clock": [1, 2]}, "clock"),
    ({"health": "ok"}, "health"),
    ({"health": ["ok", 3]}, "health"),
    ({"agent": _DROP}, "agent"),
    ({"agent": ""}, "agent"),
    ({"institution": 2201001}, "institution"),
    ({"venue": ""}, "venue"),
    ({"room": None}, "room"),
    ({"camera": _DROP}, "camera"),
    # ids become topic levels and folder names: nothing that could climb out of a folder or name a root
    ({"institution": "../../x"}, "institution"),
    ({"institution": "/etc"}, "institution"),
    ({"venue": "JL2201001/01"}, "venue"),
    ({"camera": ".."}, "camera"),
    ({"camera": "cam 1"}, "camera"),
    ({"room": "T" * 65}, "room"),
    ({"agent": "a+b"}, "agent"),
    ({"seq": 10**16}, "seq"),
    ({"size": 2**51}, "size"),
    ({"detail": "x" * 2001}, "detail"),
    ({"detail": 5}, "detail"),
    ({"health": ["black"] * 17}, "health"),
    ({"health": ["x" * 33]}, "health"),
    ({"video": {"codec": "h264" * 20, "width": 640, "height": 360, "fps": 25}}, "video"),
    ({"video": {"codec": "h264", "width": 10**9, "height": 360, "fps": 25}}, "video"),
    ({"video": {"codec": "h264", "width": 640, "height": 360, "fps": float("inf")}}, "video"),
    ({"v": "1"}, "v"),
])
def test_manifest_error_names_the_field(changes, field):
    with pytest.raises(ManifestError, match=rf"^manifest\.{field}:"):
        Manifest.from_dict(_raw(**changes))


def test_prev_must_be_null_for_seq_1():
    raw = segment().to_dict() | {"prev": "a" * 64}
    with pytest.raises(ManifestError, match=r"^manifest\.prev:"):
        Manifest.from_dict(raw)


@pytest.mark.parametrize("cause", [None, "power_cut", ""])
def test_gap_needs_a_known_cause(cause):
    raw = gap().to_dict() | {"cause": cause}
    with pytest.raises(ManifestError, match=r"^manifest\.cause:.*camera_unreachable"):
        Manifest.from_dict(raw)


@pytest.mark.parametrize("cause", GAP_CAUSES)
def test_every_gap_cause_is_accepted(cause):
    assert Manifest.from_dict(gap(cause=cause).to_dict()).cause == cause


def test_gap_needs_no_hash_or_video():
    record = Manifest.from_dict(gap().to_dict())
    assert record.kind == "gap" and record.sha256 is None and record.video is None and record.size == 0


@pytest.mark.parametrize("raw", [None, [], "manifest", 3])
def test_not_an_object(raw):
    with pytest.raises(ManifestError, match=r"^manifest:"):
        Manifest.from_dict(raw)


def test_zero_length_interval_is_allowed():
    raw = _raw(end=_raw()["start"], duration=0.0)
    assert Manifest.from_dict(raw).end == Manifest.from_dict(raw).start


def test_end_before_start_by_one_millisecond_is_refused():
    early = (START + timedelta(seconds=10) - timedelta(milliseconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    with pytest.raises(ManifestError, match=r"^manifest\.end:"):
        Manifest.from_dict(_raw(end=early))


@pytest.mark.parametrize("synced", ["false", "no", 0.0001])
def test_clock_synced_must_be_a_boolean(synced):
    raw = segment().to_dict() | {"clock": {"offset_ms": 1.0, "synced": synced}}
    with pytest.raises(ManifestError, match=r"^manifest\.clock"):
        Manifest.from_dict(raw)



def test_duration_must_not_be_a_boolean():
    with pytest.raises(ManifestError, match=r"^manifest\.duration:"):
        Manifest.from_dict(_raw(duration=True))



def test_parsed_record_hash_equals_hash_of_received_bytes_for_integer_duration():
    raw = segment(duration=10).to_dict()
    assert Manifest.from_dict(raw).record_hash() == sha256_hex(canonical_bytes(raw))
