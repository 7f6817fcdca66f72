"""Logins and transport against the real server (collector.web.HttpServer: uvicorn on a free port, in this process
so that the scrypt runs of its logins can be counted) on SQLite and PostgreSQL: the rate limit per account and per
client address, the same work and time for unknown, disabled and known users, the audit trail of every attempt,
`users disable/enable/reset-password` ending sessions at once, the security headers on every response, Secure
cookies and HSTS on HTTPS (uvicorn's TLS) and behind a TLS proxy, and the warning for plain HTTP on the network."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from collector.config import load_config
from collector.db import make_engine, session_factory, upgrade
from collector.login_throttle import LoginThrottle, LoginThrottled
from collector.models import AuditEntry
from collector.users import (ACTION_USER_DISABLE, ACTION_USER_ENABLE, ACTION_USER_LOGIN, ACTION_USER_LOGIN_FAILED,
                             ACTION_USER_PASSWORD_RESET, add_user, scrypt_runs, set_disabled)
from collector.web import HttpServer, Portal
from exam_contract.signing import generate_private_key, load_private_key
from tests.support.deploy_broker import make_test_ca
from tests.support.services import free_port

from .conftest import PASSWORD, add_accounts, assert_security_headers

BIN = Path(sys.executable).parent


@dataclass
class Site:
    """A collector database with the accounts of conftest.USERS (and "gone", disabled), no footage."""

    root: Path
    database_url: str
    engine: Engine
    sessions: sessionmaker[Session]
    key_file: Path

    def write_config(self, listen: str, **http: object) -> Path:
        path = self.root / "collector.toml"
        extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in http.items())
        path.write_text(f"""[collector]
data_dir = "{self.root / 'data'}"
database_url = "{self.database_url}"
key_file = "{self.key_file}"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[http]
listen = "{listen}"
{extra}""", encoding="utf-8")
        return path


@pytest.fixture
def site(tmp_path: Path, database_url: str) -> Iterator[Site]:
    engine = make_engine(database_url)
    upgrade(engine)
    key_file = tmp_path / "collector.key"
    generate_private_key(key_file)
    found = Site(tmp_path, database_url, engine, session_factory(engine), key_file)
    add_accounts(found)
    add_user(found.sessions, "gone", PASSWORD, "inspector", ["JL2201001"], actor="test-setup")
    set_disabled(found.sessions, "gone", True, actor="test-setup")
    yield found
    engine.dispose()


@contextlib.contextmanager
def running(site: Site, host: str = "127.0.0.1", **http: object) -> Iterator[str]:
    """The base URL of a real HttpServer on a free port, configured with the [http] keys given."""
    listen = f"{host}:{free_port()}"
    config = load_config(site.write_config(listen, **http))
    server = HttpServer(Portal(config, site.sessions, load_private_key(site.key_file)), listen)
    server.start()
    try:
        yield server.url.rstrip("/").replace("0.0.0.0", "127.0.0.1")
    finally:
        server.stop()


def log_in(http: httpx.Client, username: str, password: str = PASSWORD) -> httpx.Response:
    return http.post("/api/login", json={"username": username, "password": password})


def attempts(site: Site) -> list[tuple[str, str, str, str | None, str]]:
    """(action, actor, target, reason, client) of every login attempt in the audit log, oldest first."""
    with site.sessions() as s:
        rows = s.scalars(select(AuditEntry).where(AuditEntry.action.in_([ACTION_USER_LOGIN, ACTION_USER_LOGIN_FAILED]))
                         .order_by(AuditEntry.seq)).all()
    return [(r.action, r.actor, r.target, r.reason, json.loads(r.detail)["client"]) for r in rows]


# ---------------------------------------------------------------------------- rate limit

def test_rate_limit_per_account_then_per_address(site: Site) -> None:
    """3 failures of one name lock that name (from any address); 5 from one address lock the address, for
    every name, a right password included; each 429 has Retry-After and says what to do."""
    with running(site, login_failures_per_account=3, login_failures_per_address=5, login_window_seconds=300) as base, \
            httpx.Client(base_url=base) as http:
        for _ in range(3):
            assert log_in(http, "insp-a", "wrong password").status_code == 401
        locked = log_in(http, "insp-a")   # the right password, too late
        assert locked.status_code == 429
        assert 250 <= int(locked.headers["retry-after"]) <= 300
        assert locked.json()["detail"].startswith("too many failed logins for user 'insp-a': try again in ")
        assert_security_headers(locked.headers, https=False, what="429")

        # Another account from the same address: two more failures reach the address limit (3 + 2 = 5).
        for _ in range(2):
            assert log_in(http, "insp-b", "wrong password").status_code == 401
        for name in ("insp-b", "admin"):
            refused = log_in(http, name)
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
            assert "too many failed logins for address 127.0.0.1" in refused.json()["detail"]

        # From another address (127.0.0.2 is this host too) the address is free, the locked name is not.
        with httpx.Client(base_url=base, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
            assert log_in(other, "admin").status_code == 200
            assert log_in(other, "insp-a").status_code == 429
    failed = [(reason, client) for action, _, _, reason, client in attempts(site) if action == ACTION_USER_LOGIN_FAILED]
    assert failed == [("wrong password", "127.0.0.1")] * 3 + [("too many failed logins", "127.0.0.1")] \
        + [("wrong password", "127.0.0.1")] * 2 + [("too many failed logins", "127.0.0.1")] * 2 \
        + [("too many failed logins", "127.0.0.2")]


def test_throttle_window_slides_and_a_login_forgives_its_name() -> None:
    """The limit's arithmetic on a clock the test moves: the lock lasts until the oldest counted failure leaves
    the window, refused attempts do not extend it, and a successful login clears its name's failures only."""
    now = [1000.0]
    throttle = LoginThrottle(per_account=2, per_address=3, window_seconds=60, clock=lambda: now[0])
    throttle.begin("a", "10.0.0.1")
    now[0] += 10
    throttle.begin("a", "10.0.0.1")
    for step in (0, 30):          # refused attempts, 30 s apart, do not move the end of the lock
        now[0] += step
        with pytest.raises(LoginThrottled) as info:
            throttle.begin("a", "10.0.0.1")
        assert info.value.retry_after == 1000 + 60 - now[0]
    now[0] = 1060.5                # the first failure has left the window
    ok = throttle.begin("a", "10.0.0.1")
    throttle.succeeded(ok)         # ... and that attempt logged in: "a" starts afresh
    throttle.begin("a", "10.0.0.1")
    throttle.begin("b", "10.0.0.1")   # the address's third failure in the window (1010, 1060.5, 1060.5)
    with pytest.raises(LoginThrottled) as info:
        throttle.begin("c", "10.0.0.1")
    assert "address 10.0.0.1" in str(info.value) and info.value.retry_after == 10   # 1010 + 60 - 1060.5


# ---------------------------------------------------------------------------- the same work for every name

def test_failed_logins_cost_the_same_work_and_time(site: Site) -> None:
    """An unknown or disabled user's login runs scrypt exactly once, like a known user's wrong password (and a
    successful login); the medians of their response times agree within a generous band (0.5-2x). Both are
    measured in one run, interleaved in random order, so the comparison does not depend on this machine."""
    paths = {"known user, wrong password": ("insp-a", "wrong password"), "unknown user": ("nobody-here", PASSWORD),
             "disabled user": ("gone", PASSWORD)}
    with running(site, login_failures_per_account=1000, login_failures_per_address=100_000) as base, \
            httpx.Client(base_url=base) as http:
        for name, password in paths.values():   # warm up connections and caches
            log_in(http, name, password)
        for label, (name, password) in paths.items():
            before = scrypt_runs()
            assert log_in(http, name, password).status_code == 401
            assert scrypt_runs() - before == 1, label
        before = scrypt_runs()
        assert log_in(http, "insp-b").status_code == 200 and scrypt_runs() - before == 1

        times: dict[str, list[float]] = {label: [] for label in paths}
        for _ in range(15):
            order = list(paths)
            random.shuffle(order)
            for label in order:
                started = time.perf_counter()
                assert log_in(http, *paths[label]).status_code == 401
                times[label].append(time.perf_counter() - started)
    medians = {label: statistics.median(values) for label, values in times.items()}
    known = medians["known user, wrong password"]
    for label in ("unknown user", "disabled user"):
        assert 0.5 <= medians[label] / known <= 2.0, medians


# ---------------------------------------------------------------------------- the audit trail

def test_every_login_attempt_is_audited(site: Site) -> None:
    with running(site, login_failures_per_account=1) as base, httpx.Client(base_url=base) as http:
        assert log_in(http, "insp-a").status_code == 200
        assert log_in(http, "insp-b", "wrong password").status_code == 401
        assert log_in(http, "insp-b").status_code == 429
        assert log_in(http, "nobody-here").status_code == 401
        assert log_in(http, "gone").status_code == 401
    client = "127.0.0.1"
    assert attempts(site) == [
        (ACTION_USER_LOGIN, "user:insp-a", "user:insp-a", None, client),
        (ACTION_USER_LOGIN_FAILED, f"client:{client}", "user:insp-b", "wrong password", client),
        (ACTION_USER_LOGIN_FAILED, f"client:{client}", "user:insp-b", "too many failed logins", client),
        (ACTION_USER_LOGIN_FAILED, f"client:{client}", "user:nobody-here", "unknown user", client),
        (ACTION_USER_LOGIN_FAILED, f"client:{client}", "user:gone", "account disabled", client)]


# ---------------------------------------------------------------------------- account life

def users_cli(site: Site, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "exam-collector"), "--config", str(site.root / "collector.toml"), "users",
                           *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_disable_enable_and_reset_password_end_sessions_at_once(site: Site) -> None:
    with running(site) as base, httpx.Client(base_url=base) as http:
        def me(token: str) -> int:
            return http.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code

        first = log_in(http, "insp-a").json()["token"]
        assert me(first) == 200
        done = users_cli(site, "disable", "insp-a")
        assert done.returncode == 0 and done.stdout.strip() == "user insp-a disabled; 1 session(s) ended", done.stderr
        assert me(first) == 401                                  # at once, not at the token's expiry
        assert log_in(http, "insp-a").status_code == 401
        assert users_cli(site, "disable", "insp-a").stdout.strip() == "user insp-a is already disabled; nothing changed"
        assert "insp-a  inspector  JL2201001  disabled" in users_cli(site, "list").stdout

        done = users_cli(site, "enable", "insp-a")
        assert done.returncode == 0 and "enabled" in done.stdout
        second = log_in(http, "insp-a").json()["token"]
        assert me(second) == 200 and me(first) == 401            # the old session stays ended

        done = users_cli(site, "reset-password", "insp-a", stdin="a new secret 7\n")
        assert done.returncode == 0 and done.stdout.strip() == "password of user insp-a reset; 1 session(s) ended"
        assert me(second) == 401
        assert log_in(http, "insp-a").status_code == 401
        assert me(log_in(http, "insp-a", "a new secret 7").json()["token"]) == 200

    for command in ("disable", "enable", "reset-password"):
        wrong = users_cli(site, command, "nobody", stdin="whatever 12345\n")
        assert wrong.returncode == 1 and wrong.stderr == ("exam-collector: error: user nobody does not exist: check "
                                                          "the name with `exam-collector users list`\n"), command
    short = users_cli(site, "reset-password", "insp-b", stdin="short\n")
    assert short.returncode == 1 and len(short.stderr.splitlines()) == 1 and "shorter than 8" in short.stderr
    with site.sessions() as s:
        changes = s.scalars(select(AuditEntry).where(AuditEntry.target == "user:insp-a", AuditEntry.action.in_(
            [ACTION_USER_DISABLE, ACTION_USER_ENABLE, ACTION_USER_PASSWORD_RESET])).order_by(AuditEntry.seq)).all()
    assert [(e.action, json.loads(e.detail)) for e in changes] == [
        (ACTION_USER_DISABLE, {"sessions_ended": 1}), (ACTION_USER_ENABLE, {"sessions_ended": 0}),
        (ACTION_USER_PASSWORD_RESET, {"sessions_ended": 1})]
    assert all(e.actor.startswith("os:") for e in changes)


# ---------------------------------------------------------------------------- headers, cookies, TLS

@pytest.mark.parametrize("mode", ["plain", "behind_tls_proxy", "tls"])
def test_security_headers_on_every_response_and_secure_cookie_on_https(site: Site, mode: str) -> None:
    http_keys: dict[str, object] = {}
    verify: ssl.SSLContext | bool = True
    if mode == "behind_tls_proxy":
        http_keys["behind_tls_proxy"] = True
    if mode == "tls":
        ca = make_test_ca(site.root / "ca")
        http_keys.update(cert_file=str(ca.server_cert), key_file=str(ca.server_key))
        verify = ssl.create_default_context(cafile=str(ca.ca_cert))
    https = mode != "plain"
    with running(site, **http_keys) as base, httpx.Client(base_url=base, verify=verify) as http:
        assert base.startswith("https://" if mode == "tls" else "http://")
        answers = {"/": http.get("/"), "/static/app.js": http.get("/static/app.js"),
                   "missing static file": http.get("/static/nope.js"), "not logged in": http.get("/api/me"),
                   "invalid body": http.post("/api/login", json={}), "schema": http.get("/openapi.json"),
                   "no docs page": http.get("/docs"), "login": log_in(http, "insp-a")}
        assert [a.status_code for a in answers.values()] == [200, 200, 404, 401, 422, 200, 404, 200]
        for what, answer in answers.items():
            assert_security_headers(answer.headers, https=https, what=what)
        cookie = answers["login"].headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert ("; secure" in cookie) is https
        logout = http.post("/api/logout", headers={"Authorization": f"Bearer {answers['login'].json()['token']}"})
        assert logout.status_code == 200 and ("; secure" in logout.headers["set-cookie"].lower()) is https


def test_server_errors_carry_the_headers_too(site: Site) -> None:
    """An unhandled exception (here: the session table is gone under the running server) is answered 500 with
    the same headers; Starlette's own error answer would be sent from outside the middleware, without them."""
    from sqlalchemy import text

    with running(site) as base, httpx.Client(base_url=base) as http:
        token = log_in(http, "insp-a").json()["token"]
        with site.engine.begin() as conn:
            conn.execute(text("DROP TABLE portal_session"))
        broken = http.get("/api/me", headers={"Authorization": f"Bearer {token}"})
    assert broken.status_code == 500 and broken.text == "Internal Server Error"
    assert_security_headers(broken.headers, https=False, what="500")


def test_plain_http_beyond_loopback_is_warned(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="collector.web")
    with running(site, "127.0.0.1"):
        pass
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with running(site, "0.0.0.0") as base, httpx.Client(base_url=base) as http:
        assert http.get("/").status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "http://0.0.0.0:" in warnings[0] and "without TLS" in warnings[0]
    assert "set [http] cert_file and key_file" in warnings[0] and "\n" not in warnings[0]
