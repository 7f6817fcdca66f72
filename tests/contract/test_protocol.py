"""Protocol v1 payloads: InitMessage, fin, Reply and the chain-head exchange."""

import json
from datetime import datetime, timezone

import pytest

from exam_contract.canonical import canonical_bytes
from exam_contract.manifest import ManifestError
from exam_contract import protocol as P
from exam_contract.protocol import (REPLY_STATES, ChainHead, ChainHeads, ChainRequest, InitMessage, ProtocolError,
                                    Reply, decode_fin, encode_fin)
from exam_contract.signing import sign
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .factories import gap, segment

NOW = datetime(2026, 11, 26, 1, 31, 0, 250000, tzinfo=timezone.utc)


def _init(manifest=None, chunk_size=256 * 1024):
    manifest = manifest or segment(detail="第一考场")
    key = Ed25519PrivateKey.generate()
    return InitMessage.build(manifest, sign(key, canonical_bytes(manifest.to_dict())), chunk_size)


def test_build_counts_chunks_for_a_segment():
    message = _init(segment(size=10 * 256 * 1024 + 1))
    assert message.chunks == 11 and message.chunk_size == 256 * 1024


def test_build_gap_has_zero_chunks():
    assert _init(gap()).chunks == 0


def test_init_encode_decode_round_trip_keeps_manifest_bytes():
    message = _init()
    payload = message.encode()
    assert "第一考场".encode() in payload  # UTF-8, not \\u escapes
    decoded = InitMessage.decode(payload)
    assert decoded == message
    assert canonical_bytes(decoded.manifest_raw) == canonical_bytes(segment(detail="第一考场").to_dict())
    assert decoded.manifest() == segment(detail="第一考场")
    assert set(json.loads(payload)) == {"manifest", "signature", "chunk_size", "chunks"}


def test_manifest_errors_surface_from_init():
    raw = json.loads(_init().encode())
    raw["manifest"]["room_kind"] = "kitchen"
    with pytest.raises(ManifestError, match=r"^manifest\.room_kind:"):
        InitMessage.decode(json.dumps(raw).encode()).manifest()


def _payload(**changes):
    raw = json.loads(_init().encode())
    raw.update(changes)
    for key, value in list(raw.items()):
        if value is _DROP:
            del raw[key]
    return json.dumps(raw).encode()


_DROP = object()


@pytest.mark.parametrize("payload, field", [
    (b"", "init: malformed JSON"),
    (b"{not json", "init: malformed JSON"),
    (b"\xff\xfe", "init: malformed JSON"),
    (b"[]", "init: expected a JSON object"),
    (b'"init"', "init: expected a JSON object"),
    (_payload(manifest=_DROP), "init.manifest"),
    (_payload(manifest=[1]), "init.manifest"),
    (_payload(signature=_DROP), "init.signature"),
    (_payload(signature=64), "init.signature"),
    (_payload(chunk_size=0), "init.chunk_size"),
    (_payload(chunk_size=-5), "init.chunk_size"),
    (_payload(chunk_size=1.5), "init.chunk_size"),
    (_payload(chunk_size=True), "init.chunk_size"),
    (_payload(chunk_size=_DROP), "init.chunk_size"),
    (_payload(chunks=-1), "init.chunks"),
    (_payload(chunks="3"), "init.chunks"),
    (_payload(chunks=False), "init.chunks"),
    (_payload(chunks=_DROP), "init.chunks"),
])
def test_init_decode_errors(payload, field):
    with pytest.raises(ProtocolError, match=rf"^{field}"):
        InitMessage.decode(payload)


def test_check_chunk_count_accepts_the_right_count():
    message = _init(segment(size=1000))
    message.check_chunk_count(message.manifest())
    gap_message = _init(gap())
    gap_message.check_chunk_count(gap_message.manifest())


@pytest.mark.parametrize("manifest, chunks, expected", [
    (segment(size=1000), 2, 1),
    (segment(size=1000), 0, 1),
    (segment(size=0), 1, 0),
    (gap(), 1, 0),
])
def test_check_chunk_count_refuses_a_mismatch(manifest, chunks, expected):
    message = InitMessage(manifest.to_dict(), "sig", 256 * 1024, chunks)
    with pytest.raises(ProtocolError, match=rf"^init\.chunks: {chunks} .*expected {expected}\)"):
        message.check_chunk_count(manifest)


@pytest.mark.parametrize("reply", [
    Reply("t101-cam1-1", "stored", NOW, record="a" * 64),
    Reply("t101-cam1-2", "missing", NOW, missing=[[0, 3], [7, 7]], record="b" * 64),
    Reply("t101-cam1-3", "rejected", NOW, reason="bad_signature: 签名无效"),
])
def test_reply_round_trip(reply):
    payload = reply.encode()
    assert Reply.decode(payload) == reply
    raw = json.loads(payload)
    assert set(raw) == {"file_id", "state", "missing", "reason", "record", "collector_time"}
    assert raw["collector_time"] == "2026-11-26T01:31:00.250Z"


def test_reply_states():
    assert REPLY_STATES == ("stored", "missing", "rejected")


def test_reply_missing_defaults_to_empty():
    payload = b'{"file_id":"c-1","state":"stored","collector_time":"2026-11-26T01:31:00.250Z"}'
    assert Reply.decode(payload) == Reply("c-1", "stored", NOW)


def test_reply_encode_refuses_naive_time():
    with pytest.raises(ValueError, match="naive"):
        Reply("c-1", "stored", NOW.replace(tzinfo=None)).encode()


def _reply(**changes):
    raw = {"file_id": "c-1", "state": "missing", "missing": [[0, 1]], "reason": None,
           "collector_time": "2026-11-26T01:31:00.250Z"}
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize("payload, message", [
    (_reply(state="lost"), r"^reply\.state: 'lost' unknown"),
    (_reply(state=None), r"^reply\.state"),
    (b"", r"^reply: malformed"),
    (b"\xff", r"^reply: malformed"),
    (b"[]", r"^reply: malformed"),
    (b"42", r"^reply: malformed"),
    (b"{}", r"^reply: malformed"),
    (_reply(collector_time="2026-11-26T01:31:00Z"), r"^reply: malformed"),
    (_reply(collector_time=None), r"^reply: malformed"),
    (_reply(missing=[[0, 1, 2]]), r"^reply: malformed"),
    (_reply(missing=[["a", 1]]), r"^reply: malformed"),
    (_reply(missing=[5]), r"^reply: malformed"),
    (_reply(record="A" * 64), r"^reply\.record: not 64 lowercase hex"),
    (_reply(record="abc"), r"^reply\.record: not 64 lowercase hex"),
    (_reply(missing=[[i, i] for i in range(0, 600, 2)]), r"^reply\.missing: not a list of at most 256"),
    (_reply(reason=5), r"^reply\.reason: not a string"),
])
def test_reply_decode_errors(payload, message):
    with pytest.raises(ProtocolError, match=message):
        Reply.decode(payload)


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


def test_reply_reason_code_is_the_part_before_the_detail():
    assert Reply("c-1", "rejected", NOW, reason="bad_signature: does not verify").reason_code == "bad_signature"
    assert Reply("c-1", "stored", NOW).reason_code is None


def test_fin_names_its_record_by_hash():
    digest = "0123456789abcdef" * 4
    assert decode_fin(encode_fin(digest)) == digest
    assert encode_fin(None) == b"" and decode_fin(b"") is None


@pytest.mark.parametrize("payload", [b"x", b"A" * 64, b"\xff" * 64, b"0" * 63, b"0" * 65])
def test_fin_with_anything_but_a_record_hash_is_refused(payload):
    with pytest.raises(ProtocolError, match=r"^fin: "):
        decode_fin(payload)


def test_chain_request_and_heads_round_trip():
    request = ChainRequest("n0nce-1", ("t101-front", "p201-cam"))
    assert ChainRequest.decode(request.encode()) == request
    heads = ChainHeads("n0nce-1", {"t101-front": ChainHead(41, "c" * 64, NOW), "p201-cam": None}, NOW)
    assert ChainHeads.decode(heads.encode()) == heads


@pytest.mark.parametrize("payload", [
    b"{", b"[]", b'{"nonce":"../x","cameras":[]}', b'{"nonce":"n","cameras":["a/b"]}',
    b'{"nonce":"n","cameras":"cam"}', json.dumps({"nonce": "n", "cameras": [f"c{i}" for i in range(300)]}).encode(),
])
def test_chain_request_refuses_bad_payloads(payload):
    with pytest.raises(ProtocolError, match=r"^chain request"):
        ChainRequest.decode(payload)


@pytest.mark.parametrize("heads", [
    {"../x": None}, {"cam": {"seq": 0, "record": "c" * 64, "end": "2026-11-26T01:31:00.250Z"}},
    {"cam": {"seq": 3, "record": "nothex", "end": "2026-11-26T01:31:00.250Z"}}, {"cam": {"seq": 3}},
])
def test_chain_heads_refuses_bad_heads(heads):
    payload = json.dumps({"nonce": "n", "collector_time": "2026-11-26T01:31:00.250Z", "heads": heads}).encode()
    with pytest.raises(ProtocolError, match=r"^chain heads"):
        ChainHeads.decode(payload)


def test_rejection_codes_are_unique_and_retryable_ones_are_known():
    assert len(set(P.REJECTION_CODES)) == len(P.REJECTION_CODES)
    assert P.RETRYABLE_REJECTIONS <= set(P.REJECTION_CODES)
    assert P.REJECT_SEQ_REPLAYED not in P.RETRYABLE_REJECTIONS
