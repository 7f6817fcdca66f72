"""redact_credentials / redact_source: no password survives, whatever it holds; everything else is kept."""

import logging
import re
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from exam_contract.redact import RedactingFilter, redact_credentials, redact_source, redact_values

SOURCE = "rtsp://admin:secret@192.168.1.64:554/Streaming/Channels/101"


@pytest.mark.parametrize("text, expected", [
    (SOURCE, "rtsp://***@192.168.1.64:554/Streaming/Channels/101"),
    ("rtsps://admin:secret@cam.example:322/live", "rtsps://***@cam.example:322/live"),
    ("rtsp://admin@192.168.1.64/live", "rtsp://***@192.168.1.64/live"),
    ("[error] rtsp://admin:pw@10.0.0.5:554/ch1: Connection refused",
     "[error] rtsp://***@10.0.0.5:554/ch1: Connection refused"),
    ("Input #0, rtsp, from 'rtsp://admin:pw@10.0.0.5/ch1':", "Input #0, rtsp, from 'rtsp://***@10.0.0.5/ch1':"),
    ("rtsp://a:p1@h1/x and rtsps://b:p2@h2:322/y failed", "rtsp://***@h1/x and rtsps://***@h2:322/y failed"),
    # ffmpeg accepts an unencoded @ in the password and takes the last one
    ("rtsp://admin:p@ss@10.0.0.5/ch1: Connection refused", "rtsp://***@10.0.0.5/ch1: Connection refused"),
    ("rtsp://admin:p%40ss@10.0.0.5/ch1", "rtsp://***@10.0.0.5/ch1"),
    ("rtsp://admin:a:b;c!d#e?f/g@10.0.0.5:554/ch1: Invalid argument", "rtsp://***@10.0.0.5:554/ch1: Invalid argument"),
    ("rtsp://u:x://y@h/p", "rtsp://***@h/p"),
    ("tcp://a:b@h:1?x=1,rtsp://c:d@h/p", "tcp://***@h/p"),  # two URLs glued together: both hidden
])
def test_userinfo_is_replaced(text: str, expected: str) -> None:
    assert redact_credentials(text) == expected


@pytest.mark.parametrize("text", [
    "rtsp://192.168.1.64:554/Streaming/Channels/101",
    "[tcp @ 0x55d0c0] [error] Connection to tcp://127.0.0.1:554?timeout=0 failed: Connection refused",
    "lavfi:testsrc2=size=640x480:rate=25", "/dev/video0", "mail admin@example.org", "", "://x@y",
])
def test_text_without_userinfo_is_unchanged(text: str) -> None:
    assert redact_credentials(text) == text


def test_redacting_twice_changes_nothing_more() -> None:
    once = redact_credentials(f"{SOURCE} {SOURCE}")
    assert redact_credentials(once) == once


def test_a_long_line_without_urls_is_kept() -> None:
    text = "a" * 200_000 + " " + "b://" * 50_000
    assert redact_credentials(text) == text


def test_redact_source() -> None:
    assert redact_source(SOURCE) == "rtsp://***@192.168.1.64:554/Streaming/Channels/101"
    assert redact_source("rtsp://admin:with space@10.0.0.5/ch1") == "rtsp://***@10.0.0.5/ch1"
    for source in ("rtsp://10.0.0.5/ch1", "/dev/video0", "lavfi:testsrc2", "/srv/clip with space.ts"):
        assert redact_source(source) == source


def test_a_known_source_is_redacted_whole_even_with_whitespace_in_its_password() -> None:
    source = "rtsp://admin:two words@10.0.0.5/ch1"
    line = f"[error] {source}: Connection refused"
    assert redact_credentials(line, source) == "[error] rtsp://***@10.0.0.5/ch1: Connection refused"


def test_redact_values_walks_json_like_values() -> None:
    status = {"alarms": {"camera_lost": f"{SOURCE}: refused"}, "health": {"c1": ["black"]}, "n": 3, "ok": None}
    assert redact_values(status) == {"alarms": {"camera_lost": "rtsp://***@192.168.1.64:554/Streaming/Channels/101: "
                                                               "refused"},
                                     "health": {"c1": ["black"]}, "n": 3, "ok": None}


def test_the_log_filter_redacts_message_arguments_and_tracebacks() -> None:
    record = logging.LogRecord("edge", logging.ERROR, __file__, 1, "camera %s: %s", ("c1", f"{SOURCE}: refused"),
                               None)
    try:
        raise OSError(f"cannot open {SOURCE}")
    except OSError:
        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    text = logging.Formatter("%(message)s").format(record)
    assert "secret" not in text
    assert "camera c1: rtsp://***@192.168.1.64:554/Streaming/Channels/101: refused" in text
    assert "OSError: cannot open rtsp://***@192.168.1.64" in text


# Userinfo characters: anything printable but whitespace (a URL ends there).
userinfo = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), min_size=1, max_size=20) \
    .filter(lambda s: re.search(r"\s", s) is None)


@settings(deadline=None)  # no timing thresholds in tests
@given(user=userinfo, password=userinfo.filter(lambda s: len(s) >= 4), other=userinfo, scheme=st.sampled_from(
    ["rtsp", "rtsps", "http"]), port=st.integers(min_value=1, max_value=65535))
def test_no_password_survives(user: str, password: str, other: str, scheme: str, port: int) -> None:
    text = (f"[error] {scheme}://{user}:{password}@10.1.2.3:{port}/stream: Connection refused; "
            f"Input #0, rtsp, from '{scheme}://{other}:{password}@cam.example/ch1':")
    expected = (f"[error] {scheme}://***@10.1.2.3:{port}/stream: Connection refused; "
                f"Input #0, rtsp, from '{scheme}://***@cam.example/ch1':")
    assume(password not in expected)
    redacted = redact_credentials(text)
    assert password not in redacted
    assert redacted == expected
    assert redact_source(f"{scheme}://{user}:{password}@10.1.2.3:{port}/stream") == \
        f"{scheme}://***@10.1.2.3:{port}/stream"
