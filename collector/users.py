"""Portal accounts and logins: scrypt password hashes, expiring bearer tokens, institution scoping.

Every login attempt costs one scrypt run, whether the user is known, unknown or disabled, so that response times
do not tell which names exist; every attempt is written to the audit log with its outcome and client address.
Disabling an account or resetting its password ends its sessions at once."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from . import audit
from .models import PortalSession, PortalUser

ROLES: tuple[str, ...] = ("inspector", "admin")
SESSION_HOURS = 8
MIN_PASSWORD = 8
# scrypt cost: 2**14 * 8 * 128 bytes = 16 MiB of memory per check, about 50 ms here.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{1,127}$")
ACTION_USER_ADD = "user.add"
ACTION_USER_LOGIN = "user.login"                    # detail: the client address
ACTION_USER_LOGIN_FAILED = "user.login_failed"      # reason: a LoginFailure; detail: the client address
ACTION_USER_DISABLE = "user.disable"                # detail: how many sessions were ended
ACTION_USER_ENABLE = "user.enable"
ACTION_USER_PASSWORD_RESET = "user.password_reset"  # detail: how many sessions were ended


class LoginFailure(str, Enum):
    """Why a login failed: the audit entry's reason. The client is only ever told "wrong user name or password"
    (or, for RATE_LIMITED, to wait)."""

    UNKNOWN_USER = "unknown user"
    DISABLED = "account disabled"
    WRONG_PASSWORD = "wrong password"
    RATE_LIMITED = "too many failed logins"


class UserError(ValueError):
    """An account cannot be created or changed; the message says why and what to do."""


class UnknownUser(UserError):
    def __init__(self, username: str) -> None:
        super().__init__(f"user {username} does not exist: check the name with `exam-collector users list`")


class AuthError(Exception):
    """Login failed or the token is unknown or expired (always the same message: no hint to a guesser)."""


class LoginFailed(AuthError):
    """A refused login; `failure` says why, for the audit log only."""

    def __init__(self, failure: LoginFailure) -> None:
        super().__init__("wrong user name or password")
        self.failure = failure


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: str
    institutions: tuple[str, ...]
    disabled: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, institution: str | None) -> bool:
        return self.is_admin or (institution is not None and institution in self.institutions)

    @property
    def actor(self) -> str:
        """How the audit log names this user."""
        return f"user:{self.username}"


@dataclass(frozen=True)
class Login:
    token: str
    expires_at: datetime
    user: User


@dataclass(frozen=True)
class AccountChange:
    """What `set_disabled` or `reset_password` did."""

    user: User
    changed: bool          # False when the account already was in the state asked for
    sessions_ended: int


_scrypt_lock = threading.Lock()
_scrypt_runs = 0


def scrypt_runs() -> int:
    """How many scrypt derivations this process has run (tests compare the work of the login paths with it)."""
    return _scrypt_runs


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    global _scrypt_runs
    with _scrypt_lock:
        _scrypt_runs += 1
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen)


def _hash_text(salt: bytes, digest: bytes) -> str:
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    return _hash_text(salt, _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, 32))


# Checked instead of a stored hash for unknown and disabled users: the same scrypt work as a real check, and
# no password can match its random digest.
NO_USER_HASH = _hash_text(secrets.token_bytes(16), secrets.token_bytes(32))


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p), len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def _check_password_rule(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password is shorter than {MIN_PASSWORD} characters: choose a longer one")


def _user(row: PortalUser) -> User:
    return User(row.id, row.username, row.role, tuple(json.loads(row.institutions or "[]")),
                disabled=row.disabled_at is not None)


def _user_row(session: Session, username: str) -> PortalUser:
    row = session.scalar(select(PortalUser).where(PortalUser.username == username))
    if row is None:
        raise UnknownUser(username)
    return row


def get_user(session: Session, username: str) -> User:
    """The account named `username`; UnknownUser (a UserError) when there is none."""
    return _user(_user_row(session, username))


def add_user(sessions: sessionmaker[Session], username: str, password: str, role: str,
             institutions: tuple[str, ...] | list[str], actor: str) -> User:
    if not USERNAME_RE.match(username or ""):
        raise UserError(f"user name {username!r} is not usable: use 2-128 letters, digits, '.', '_', '@', '-'")
    if role not in ROLES:
        raise UserError(f"--role {role!r} is not one of {', '.join(ROLES)}")
    codes = tuple(sorted({c.strip() for c in institutions if c.strip()}))
    if role == "inspector" and not codes:
        raise UserError("an inspector needs at least one --institution CODE (机构代码), e.g. JL2201001")
    _check_password_rule(password)
    with sessions.begin() as session:
        if session.scalar(select(PortalUser.id).where(PortalUser.username == username)) is not None:
            raise UserError(f"user {username} already exists: choose another name")
        row = PortalUser(username=username, password_hash=hash_password(password), role=role,
                         institutions=json.dumps(list(codes)), created_at=datetime.now(timezone.utc))
        session.add(row)
        session.flush()
        audit.record(session, ACTION_USER_ADD, actor=actor, target=f"user:{username}",
                     detail={"role": role, "institutions": list(codes)})
        return _user(row)


def list_users(session: Session) -> list[User]:
    return [_user(r) for r in session.scalars(select(PortalUser).order_by(PortalUser.username))]


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _record_failure(session: Session, username: str, client: str, failure: LoginFailure,
                    **detail: object) -> None:
    audit.record(session, ACTION_USER_LOGIN_FAILED, actor=f"client:{client}", target=f"user:{username}",
                 reason=failure.value, detail={"client": client, **detail})


def _login_failure(row: PortalUser | None, password: str) -> LoginFailure | None:
    """Why `password` does not log in the user of `row` (None: it does). Unknown and disabled users are checked
    against NO_USER_HASH, so that every path costs one scrypt run, like a known user's wrong password."""
    usable = row if row is not None and row.disabled_at is None else None
    matches = check_password(password, usable.password_hash if usable is not None else NO_USER_HASH)
    if row is None:
        return LoginFailure.UNKNOWN_USER
    if usable is None:
        return LoginFailure.DISABLED
    return None if matches else LoginFailure.WRONG_PASSWORD


def login(sessions: sessionmaker[Session], username: str, password: str, *, client: str,
          hours: float = SESSION_HOURS) -> Login:
    """A new session for `username`, or LoginFailed; either way audit-logged with `client` (the client's address)."""
    with sessions.begin() as session:
        row = session.scalar(select(PortalUser).where(PortalUser.username == username))
        failure = _login_failure(row, password)
        if row is not None and failure is None:
            now = datetime.now(timezone.utc)
            token = secrets.token_urlsafe(32)
            expires = now + timedelta(hours=hours)
            session.execute(delete(PortalSession).where(PortalSession.user_id == row.id,
                                                        PortalSession.expires_at < now))
            session.add(PortalSession(token_hash=_token_hash(token), user_id=row.id, created_at=now,
                                      expires_at=expires))
            done = Login(token, expires, _user(row))
            audit.record(session, ACTION_USER_LOGIN, actor=done.user.actor, target=done.user.actor,
                         detail={"client": client})
            return done
        refused = failure or LoginFailure.UNKNOWN_USER   # (no row: UNKNOWN_USER already)
        _record_failure(session, username, client, refused)
    raise LoginFailed(refused)


def refuse_login(sessions: sessionmaker[Session], username: str, client: str, retry_after: int) -> None:
    """Audit-log a login refused by the rate limit (no password was checked)."""
    with sessions.begin() as session:
        _record_failure(session, username, client, LoginFailure.RATE_LIMITED, retry_after=retry_after)


def _end_sessions(session: Session, user_id: int) -> int:
    """Delete every session of the user; how many there were (expired ones included)."""
    count = session.scalar(select(func.count()).select_from(PortalSession).where(PortalSession.user_id == user_id))
    session.execute(delete(PortalSession).where(PortalSession.user_id == user_id))
    return int(count or 0)


def set_disabled(sessions: sessionmaker[Session], username: str, disabled: bool, actor: str) -> AccountChange:
    """Disable an account (its sessions end at once; it cannot log in) or enable it again; audit-logged."""
    with sessions.begin() as session:
        row = _user_row(session, username)
        if (row.disabled_at is not None) == disabled:
            return AccountChange(_user(row), changed=False, sessions_ended=0)
        row.disabled_at = datetime.now(timezone.utc) if disabled else None
        ended = _end_sessions(session, row.id)
        audit.record(session, ACTION_USER_DISABLE if disabled else ACTION_USER_ENABLE, actor=actor,
                     target=f"user:{username}", detail={"sessions_ended": ended})
        return AccountChange(_user(row), changed=True, sessions_ended=ended)


def reset_password(sessions: sessionmaker[Session], username: str, password: str, actor: str) -> AccountChange:
    """Set a new password; the account's sessions end at once; audit-logged (without the password)."""
    _check_password_rule(password)
    with sessions.begin() as session:
        row = _user_row(session, username)
        row.password_hash = hash_password(password)
        ended = _end_sessions(session, row.id)
        audit.record(session, ACTION_USER_PASSWORD_RESET, actor=actor, target=f"user:{username}",
                     detail={"sessions_ended": ended})
        return AccountChange(_user(row), changed=True, sessions_ended=ended)


def authenticate(sessions: sessionmaker[Session], token: str | None) -> User:
    if not token:
        raise AuthError("not logged in")
    with sessions() as session:
        found = session.execute(select(PortalSession, PortalUser)
                                .join(PortalUser, PortalUser.id == PortalSession.user_id)
                                .where(PortalSession.token_hash == _token_hash(token))).first()
    if found is None:
        raise AuthError("not logged in")
    login_row, user_row = found
    if login_row.expires_at <= datetime.now(timezone.utc) or user_row.disabled_at is not None:
        raise AuthError("the session has expired: log in again")
    return _user(user_row)


def logout(sessions: sessionmaker[Session], token: str) -> None:
    with sessions.begin() as session:
        session.execute(delete(PortalSession).where(PortalSession.token_hash == _token_hash(token)))
