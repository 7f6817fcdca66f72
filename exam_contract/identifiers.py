"""Identifiers that travel in topics, manifests and storage paths: one rule, checked on both sides.

Agent, institution, venue, room and camera ids become MQTT topic levels and folder names. A signature
proves who sent an id, not that it is sane, so every receiver checks them with `check_identifier` before
using one in a path, a topic or a query.
"""

from __future__ import annotations

import re
from typing import TypeGuard

IDENTIFIER_MAX = 64
# Letters, digits, '.', '_' and '-', starting with a letter or digit: never '/', '..', a wildcard, a space
# or an absolute path, whatever the platform.
_IDENTIFIER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# `{camera}-{seq}`: a camera id, a dash and a decimal seq.
FILE_ID_MAX = IDENTIFIER_MAX + 21
_FILE_ID_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)-([1-9][0-9]{0,18})")
IDENTIFIER_RULE = f"1 to {IDENTIFIER_MAX} letters, digits, '.', '_' or '-', starting with a letter or digit"


class IdentifierError(ValueError):
    """An id is not usable as a topic level or path component; the message names it and the rule."""


def is_identifier(value: object) -> TypeGuard[str]:
    return (isinstance(value, str) and len(value) <= IDENTIFIER_MAX and value.isascii()
            and _IDENTIFIER_RE.fullmatch(value) is not None)


def check_identifier(value: object, what: str) -> str:
    """`value` if it is a valid identifier, else IdentifierError naming `what`."""
    if not is_identifier(value):
        raise IdentifierError(f"{what} {value!r} is not a valid id: use {IDENTIFIER_RULE}")
    return value


def is_file_id(value: object) -> bool:
    """`{camera}-{seq}` with a valid camera id and seq >= 1."""
    if not isinstance(value, str) or len(value) > FILE_ID_MAX or not value.isascii():
        return False
    match = _FILE_ID_RE.fullmatch(value)
    return match is not None and is_identifier(match.group(1))
