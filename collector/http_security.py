"""Transport security of the HTTP API and portal: the headers on every response, and HTTPS with uvicorn's own TLS.

The portal is plain files from collector/static/ (no inline script or style, no CDN), so its Content-Security-Policy
allows only this origin; video plays from /api/segments/ID/video, also this origin.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import HttpConfig

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self'", "media-src 'self'",
    "connect-src 'self'", "font-src 'self'", "object-src 'none'", "base-uri 'none'", "form-action 'self'",
    "frame-ancestors 'none'"])
STRICT_TRANSPORT_SECURITY = "max-age=31536000"   # one year; no includeSubDomains: the domain is not ours to bind


class TlsFilesError(ValueError):
    """`[http] cert_file` / `key_file` cannot be used; the message names the key and the fix."""


def security_headers(https: bool) -> dict[str, str]:
    """The headers every response carries; HSTS only when browsers reach the portal over HTTPS."""
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Frame-Options": "DENY",
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
               "Cross-Origin-Opener-Policy": "same-origin"}
    if https:
        headers["Strict-Transport-Security"] = STRICT_TRANSPORT_SECURITY
    return headers


class SecurityHeaders:
    """ASGI middleware adding `security_headers` to every HTTP response: API, static files and errors.

    Starlette answers an unhandled exception from a middleware outside this one, so that answer (500) is given
    here instead, with the headers; the exception is then raised on for the server to log."""

    def __init__(self, app: ASGIApp, https: bool) -> None:
        self.app = app
        self.headers = security_headers(https)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    headers[name] = value
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if not started:
                await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send_with_headers)
            raise


def tls_options(http: HttpConfig) -> dict[str, Any]:
    """uvicorn.Config's TLS arguments for `[http] cert_file`/`key_file` ({} without them), the files checked now
    so that a missing or unusable one stops `serve` with one line naming the key. TLS 1.2 at least."""
    if http.cert_file is None:
        return {}
    for key, path in (("cert_file", http.cert_file), ("key_file", http.key_file)):
        if path is not None and not path.is_file():
            raise TlsFilesError(f"[http] {key} = {str(path)!r} does not exist: create it or fix the path")
    try:
        _tls12(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)).load_cert_chain(http.cert_file, http.key_file)
    except (ssl.SSLError, OSError) as exc:
        key_text = f" with key_file = {str(http.key_file)!r}" if http.key_file else " (no key_file)"
        raise TlsFilesError(f"[http] cert_file = {str(http.cert_file)!r}{key_text} cannot be used "
                            f"({getattr(exc, 'strerror', None) or exc}): give the PEM certificate chain in cert_file "
                            "and its private key in key_file, readable by this user") from exc
    return {"ssl_certfile": str(http.cert_file), "ssl_keyfile": str(http.key_file) if http.key_file else None,
            "ssl_context_factory": _tls_factory}


def _tls12(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _tls_factory(_config: object, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    return _tls12(default())


def is_loopback(host: str) -> bool:
    """Only this machine can connect to `host` (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
