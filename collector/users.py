"""Portal accounts and logins: scrypt password hashes, expiring bearer tokens, institution scoping."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select
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


class UserError(ValueError):
    """An account cannot be created or changed; the message says why and what to do."""


class AuthError(Exception):
    """Login failed or the token is unknown or expired (always the same message: no hint to a guesser)."""


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: str
    institutions: tuple[str, ...]

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


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                                p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def _user(row: PortalUser) -> User:
    return User(row.id, row.username, row.role, tuple(json.loads(row.institutions or "[]")))


def add_user(sessions: sessionmaker[Session], username: str, password: str, role: str,
             institutions: tuple[str, ...] | list[str], actor: str) -> User:
    if not USERNAME_RE.match(username or ""):
        raise UserError(f"user name {username!r} is not usable: use 2-128 letters, digits, '.', '_', '@', '-'")
    if role not in ROLES:
        raise UserError(f"--role {role!r} is not one of {', '.join(ROLES)}")
    codes = tuple(sorted({c.strip() for c in institutions if c.strip()}))
    if role == "inspector" and not codes:
        raise UserError("an inspector needs at least one --institution CODE (机构代码), e.g. JL2201001")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password is shorter than {MIN_PASSWORD} characters: choose a longer one")
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


def login(sessions: sessionmaker[Session], username: str, password: str,
          hours: float = SESSION_HOURS) -> Login:
    with sessions.begin() as session:
        row = session.scalar(select(PortalUser).where(PortalUser.username == username))
        if row is None or row.disabled_at is not None or not check_password(password, row.password_hash):
            if row is None:
                check_password(password, hash_password("x" * MIN_PASSWORD))  # same cost for unknown users
            raise AuthError("wrong user name or password")
        now = datetime.now(timezone.utc)
        token = secrets.token_urlsafe(32)
        expires = now + timedelta(hours=hours)
        session.execute(delete(PortalSession).where(PortalSession.user_id == row.id, PortalSession.expires_at < now))
        session.add(PortalSession(token_hash=_token_hash(token), user_id=row.id, created_at=now, expires_at=expires))
        return Login(token, expires, _user(row))


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
