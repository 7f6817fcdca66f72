"""Canonical JSON bytes and the UTC time format every manifest uses."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from typing import Any

TIME_FORMAT_HINT = "YYYY-MM-DDTHH:MM:SS.mmmZ"


def canonical_bytes(obj: Any) -> bytes:
    """The exact bytes that are signed and chained (docs/protocol.md, Records)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def format_time(moment: datetime) -> str:
    """UTC, millisecond precision, `Z` suffix. Naive datetimes are refused: time is UTC inside."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: attach a timezone (UTC inside)")
    utc = moment.astimezone(timezone.utc)
    millis = utc.microsecond // 1000
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + f".{millis:03d}Z"


def parse_time(text: str) -> datetime:
    """Inverse of `format_time`; raises ValueError naming the expected format."""
    if not isinstance(text, str) or len(text) != 24 or not text.endswith("Z") or text[19] != ".":
        raise ValueError(f"time {text!r} is not in the form {TIME_FORMAT_HINT}")
    digits = text[20:23]
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"time {text!r} is not in the form {TIME_FORMAT_HINT}")
    try:
        base = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError as exc:
        raise ValueError(f"time {text!r} is not in the form {TIME_FORMAT_HINT}") from exc
    moment = base.replace(tzinfo=timezone.utc) + timedelta(milliseconds=int(digits))
    # strptime tolerates single-digit fields and spaces; only the exact canonical spelling is one time.
    if format_time(moment) != text:
        raise ValueError(f"time {text!r} is not in the form {TIME_FORMAT_HINT}")
    return moment


def truncate_to_millis(moment: datetime) -> datetime:
    return moment.replace(microsecond=(moment.microsecond // 1000) * 1000)
