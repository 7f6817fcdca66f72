"""Credentials out of text: `rtsp://user:pass@host/path` becomes `rtsp://***@host/path` wherever it appears
(camera sources, ffmpeg messages, log lines, gap details, status and probe output)."""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
# Not preceded by a scheme character, so a long run of letters is scanned once, not once per position.
_SCHEME = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://")
_WHITESPACE = re.compile(r"\s")


def redact_credentials(text: str, *sources: str) -> str:
    """`text` with the userinfo of every `scheme://userinfo@...` URL replaced by `***`; each of `sources`
    (a camera source the caller knows is in the text) is first replaced whole by its `redact_source`.

    A URL ends at whitespace, and its userinfo runs to the last `@` before that. ffmpeg takes the last `@`
    of the authority (`rtsp://u:p@ss@host/`), and a password may hold an unencoded `/`, `?` or `#` that ends
    the authority early; so a `@` in a URL's path also counts (`rtsp://host/a@b` becomes `rtsp://***@b`):
    showing too little is safe, showing a password is not. A password with whitespace must be
    percent-encoded, unless it is in one of `sources`."""
    for source in sources:
        if source:
            text = text.replace(source, redact_source(source))
    parts: list[str] = []
    pos = 0
    while (scheme := _SCHEME.search(text, pos)) is not None:
        after = scheme.end()
        space = _WHITESPACE.search(text, after)
        end = space.start() if space is not None else len(text)
        at = text.rfind("@", after, end)
        if at < 0:
            parts.append(text[pos:end])
        else:
            # Anything after the last `@` of this run holds no `@`, so no further URL in it has userinfo.
            parts.extend((text[pos:after], MASK, text[at:end]))
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


def redact_source(source: str) -> str:
    """A camera source with its credentials replaced: the whole string is one URL (even with a space in
    it); a device, file or lavfi source is returned unchanged."""
    scheme = _SCHEME.match(source)
    if scheme is None:
        return redact_credentials(source)
    at = source.rfind("@", scheme.end())
    return source if at < 0 else source[:scheme.end()] + MASK + source[at:]


def redact_values(value: Any) -> Any:
    """A JSON-like value (dicts, lists, strings...) with `redact_credentials` applied to every string in it."""
    if isinstance(value, str):
        return redact_credentials(value)
    if isinstance(value, dict):
        return {redact_values(k): redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """Redacts credentials in every record passing the handler it is installed on: the formatted message
    and a traceback (an exception's text can quote a URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_credentials(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_credentials(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_credentials(record.stack_info)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a RedactingFilter to each handler of `logger` (default: the root logger) that has none yet."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
