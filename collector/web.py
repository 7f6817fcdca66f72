"""HTTP API and web portal of `exam-collector serve` (FastAPI; OpenAPI at /openapi.json; no /docs page, whose
Swagger UI would come from a CDN with inline script, which the Content-Security-Policy forbids).

Authentication: POST /api/login gives a bearer token (also set as an HttpOnly cookie, so that <video> can
play; Secure on HTTPS); tokens expire. Failed logins are rate-limited per account and per client address
(collector/login_throttle.py). Every response carries the security headers of collector/http_security.py;
`[http] cert_file`/`key_file` serve HTTPS with uvicorn's own TLS. Authorization: an inspector sees only the
batches and footage of the institutions of their account; anything else answers 404, as if it did not exist.
Every view of footage or coverage, every export and every download is written to the audit log.

Segments are stored as MPEG-TS, which Chromium cannot play: playback serves an MP4 remuxed with
`ffmpeg -c copy` (no re-encode, collector/viewing.py), cached under `data_dir/cache/mp4/` by the segment's
SHA-256, with HTTP range requests. Stored footage is read only through the portal's `FootageStore`.

The routes stay in one `create_app` because they share its closures (sessions, report_of, visible_batch,
record_view); split into routers they would only pass those around.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import subprocess
import threading
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as Path_
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import format_time

from . import audit
from .batches import (SHANGHAI, BatchImportError, BatchNotFound, batch_report, import_batches, linked_records,
                      report_json)
from .config import CollectorConfig
from .export import ExportError, ExportSettings, export_batch
from .footage_store import FootageStore, StoredFileMissing, UnsafePath, store_for
from .http_security import SecurityHeaders, is_loopback, tls_options
from .login_throttle import LoginThrottle, LoginThrottled
from .models import ExamBatch, ExamBatchPart, SegmentRecord
from .users import AuthError, User, authenticate, login, logout, refuse_login
from .viewing import playable_mp4

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# No control characters (PostgreSQL refuses NUL in text) and no slash; anything else, Chinese included, is fine.
TEXT_RE = r"^[^\x00-\x1f\x7f/]+$"
BatchId = Annotated[str, Path_(max_length=128, pattern=TEXT_RE)]
SegmentId = Annotated[int, Path_(ge=1, le=2 ** 62)]
COOKIE = "exam_session"
EXPORT_ID_RE = re.compile(r"^[A-Za-z0-9-]{8,80}$")
Status = Literal["complete", "gaps", "no_footage", "pending"]


class ListenError(ValueError):
    """`[http] listen` cannot be used."""


# ---------------------------------------------------------------------------- request and response bodies

class LoginBody(BaseModel):
    username: str = Field(min_length=1, max_length=128, pattern=TEXT_RE)
    password: str = Field(min_length=1, max_length=1024)


class UserOut(BaseModel):
    username: str
    role: str
    institutions: list[str]


class LoginOut(BaseModel):
    token: str
    expires_at: str
    user: UserOut


class ExportBody(BaseModel):
    reason: str = Field(min_length=1, max_length=2000, description="Why the footage is exported (audit log).")


class ExportOut(BaseModel):
    export_id: str
    batch_id: str
    download: str
    segments: int
    bytes: int
    gaps: int
    audit_entry: int


class BatchItem(BaseModel):
    batch_id: str
    institution: str
    occupation: str
    level: str
    status: str
    parts: int
    venues: list[str]
    start: str | None
    end: str | None
    start_local: str | None
    end_local: str | None


@dataclass
class Portal:
    config: CollectorConfig
    sessions: sessionmaker[Session]
    key: Ed25519PrivateKey
    store: FootageStore = None  # type: ignore[assignment]  # the configured one (store_for) when not given

    def __post_init__(self) -> None:
        if self.store is None:
            self.store = store_for(self.config)

    @property
    def cache_dir(self) -> Path:
        return self.config.data_dir / "cache" / "mp4"

    @property
    def exports_dir(self) -> Path:
        return self.config.data_dir / "exports"


def remove_old_exports(exports_dir: Path, keep: timedelta, now: datetime | None = None) -> list[str]:
    """Remove the HTTP exports (data_dir/exports/ID) made longer than `keep` ago; their ids. Only these
    downloadable copies go: the stored footage and the audit entries of the exports stay."""
    cutoff = (now or datetime.now(timezone.utc)).timestamp() - keep.total_seconds()
    removed: list[str] = []
    if not exports_dir.is_dir():
        return removed
    for folder in sorted(exports_dir.iterdir()):
        if not (folder.is_dir() and EXPORT_ID_RE.match(folder.name)):
            continue
        made = folder / "export.json"
        try:
            made_at = (made if made.exists() else folder).stat().st_mtime
        except FileNotFoundError:
            continue
        if made_at < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed HTTP export %s (older than %s h)", folder.name, keep.total_seconds() / 3600)
            removed.append(folder.name)
    return removed


def _local(t: datetime | None) -> str | None:
    return t.astimezone(SHANGHAI).isoformat(timespec="seconds") if t else None


def _range_start(header: str | None) -> int | None:
    """The first byte a Range header asks for (None when absent or not a simple bytes range)."""
    if not header:
        return None
    match = re.match(r"^\s*bytes\s*=\s*(\d*)\s*-", header)
    if not match:
        return None
    return int(match.group(1)) if match.group(1) else None


def _client_address(request: Request) -> str:
    """The client's address (with `[http] behind_tls_proxy`, the one the local proxy forwards for)."""
    return request.client.host if request.client else "unknown"


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE)


def current_user(request: Request) -> User:
    """The logged-in user of a request (bearer token or session cookie), else 401."""
    try:
        return authenticate(request.app.state.portal.sessions, _token(request))
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


Auth = Annotated[User, Depends(current_user)]


def create_app(portal: Portal) -> FastAPI:
    app = FastAPI(title="exam-footage collector", version="1", docs_url=None, redoc_url=None,
                  description="Inspectors' API: batches (批次), coverage, footage playback, evidence export.")
    sessions = portal.sessions
    cfg = portal.config
    throttle = LoginThrottle.from_config(cfg.http)
    app.add_middleware(SecurityHeaders, https=cfg.http.https)

    app.state.portal = portal
    def report_of(session: Session, batch_id: str):  # noqa: ANN202
        return batch_report(session, batch_id, tolerance_seconds=cfg.coverage.gap_tolerance_seconds,
                            pre_margin_minutes=cfg.coverage.pre_margin_minutes,
                            post_margin_minutes=cfg.coverage.post_margin_minutes, staging_dir=cfg.staging_dir)

    def visible_batch(session: Session, user: User, batch_id: str) -> ExamBatch:
        batch = session.get(ExamBatch, batch_id)
        if batch is None or not user.may_see(batch.institution):
            raise HTTPException(404, f"batch {batch_id} not found")
        return batch

    def record_view(user: User, target: str, detail: dict[str, Any], action: str = audit.ACTION_FOOTAGE_VIEW) -> None:
        with sessions.begin() as session:
            audit.record(session, action, actor=user.actor, target=target, detail={"via": "http", **detail})

    # ------------------------------------------------------------------ session

    @app.post("/api/login", response_model=LoginOut, tags=["session"],
              responses={401: {"description": "wrong user name or password"},
                         429: {"description": "too many failed logins of this user name or from this address; "
                                              "Retry-After gives the seconds to wait"}})
    def api_login(body: LoginBody, request: Request, response: Response) -> LoginOut:
        client = _client_address(request)
        try:
            attempt = throttle.begin(body.username, client)
        except LoginThrottled as exc:
            refuse_login(sessions, body.username, client, exc.retry_after)
            raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        try:
            done = login(sessions, body.username, body.password, client=client)
        except AuthError as exc:
            raise HTTPException(401, str(exc)) from None
        throttle.succeeded(attempt)
        max_age = int((done.expires_at - datetime.now(timezone.utc)).total_seconds())
        response.set_cookie(COOKIE, done.token, max_age=max_age, httponly=True, samesite="strict", path="/",
                            secure=cfg.http.https)
        return LoginOut(token=done.token, expires_at=format_time(done.expires_at),
                        user=UserOut(username=done.user.username, role=done.user.role,
                                     institutions=list(done.user.institutions)))

    @app.post("/api/logout", tags=["session"], responses={401: {"description": "not logged in"}})
    def api_logout(request: Request, response: Response, user: Auth) -> dict[str, bool]:
        token = _token(request)
        if token:
            logout(sessions, token)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=cfg.http.https)
        return {"ok": True}

    @app.get("/api/me", response_model=UserOut, tags=["session"], responses={401: {"description": "not logged in"}})
    def api_me(user: Auth) -> UserOut:
        return UserOut(username=user.username, role=user.role, institutions=list(user.institutions))

    # ------------------------------------------------------------------ batches

    @app.get("/api/batches", response_model=list[BatchItem], tags=["batches"],
             responses={401: {"description": "not logged in"}})
    def api_batches(user: Auth,
                    institution: Annotated[str | None, Query(max_length=64, pattern=TEXT_RE)] = None,
                    venue: Annotated[str | None, Query(max_length=64, pattern=TEXT_RE)] = None,
                    on: Annotated[date | None, Query(alias="date", description="exam day, Asia/Shanghai")] = None,
                    status: Status | None = None) -> list[BatchItem]:
        items: list[BatchItem] = []
        with sessions() as session:
            query = select(ExamBatch).order_by(ExamBatch.id)
            if institution:
                query = query.where(ExamBatch.institution == institution)
            if not user.is_admin:
                query = query.where(ExamBatch.institution.in_(list(user.institutions)))
            for batch in session.scalars(query):
                parts = list(session.scalars(select(ExamBatchPart).where(ExamBatchPart.batch_id == batch.id)))
                if venue and all(p.venue != venue for p in parts):
                    continue
                if on and all(p.start_at.astimezone(SHANGHAI).date() != on for p in parts):
                    continue
                report = report_of(session, batch.id)
                if status and report.status != status:
                    continue
                start = min((p.start_at for p in parts), default=None)
                end = max((p.end_at for p in parts), default=None)
                items.append(BatchItem(batch_id=batch.id, institution=batch.institution,
                                       occupation=batch.occupation, level=batch.level, status=report.status,
                                       parts=len(parts), venues=sorted({p.venue for p in parts}),
                                       start=format_time(start) if start else None,
                                       end=format_time(end) if end else None,
                                       start_local=_local(start), end_local=_local(end)))
        items.sort(key=lambda b: (b.start or "", b.batch_id), reverse=True)
        return items

    @app.get("/api/batches/{batch_id}", tags=["batches"],
             responses={401: {"description": "not logged in"}, 404: {"description": "no such batch visible"}})
    def api_batch(batch_id: BatchId, user: Auth) -> dict[str, Any]:
        """Coverage of every part and camera, with each camera's segments for the timeline."""
        with sessions() as session:
            visible_batch(session, user, batch_id)
            report = report_of(session, batch_id)
            out = report_json(report)
            for part_json, part in zip(out["parts"], report.parts, strict=True):
                records = linked_records(session, part.venue, part.room, part.start, part.end)
                for cam in part_json["cameras"]:
                    cam["segments"] = [
                        {"id": r.id, "seq": r.seq, "start": format_time(r.start_at), "end": format_time(r.end_at),
                         "health": list(json.loads(r.manifest).get("health") or []),
                         "playable": r.storage_path is not None and r.deleted_at is None}
                        for r in records if r.camera == cam["camera"] and r.kind == "segment"]
        record_view(user, batch_id, {"what": "batch"})
        return out

    @app.get("/api/batches/{batch_id}/coverage", tags=["batches"],
             responses={401: {"description": "not logged in"}, 404: {"description": "no such batch visible"}})
    def api_coverage(batch_id: BatchId, user: Auth) -> dict[str, Any]:
        with sessions() as session:
            visible_batch(session, user, batch_id)
            out = report_json(report_of(session, batch_id))
        record_view(user, batch_id, {"what": "coverage"})
        return out

    @app.post("/api/batches/import", tags=["batches"], status_code=200,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "text/csv": {"schema": {"type": "string"}},
                  "application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}}},
              responses={401: {"description": "not logged in"}, 403: {"description": "admins only"},
                         422: {"description": "the file was not imported; each problem listed"}})
    async def api_import(request: Request, user: Auth,
                         source: Annotated[str, Query(max_length=200, pattern=TEXT_RE)] = "http upload",
                         allow_room_change: bool = False) -> JSONResponse:
        """Import batch parts from the exam-affairs system (CSV or JSON; all or nothing)."""
        if not user.is_admin:
            raise HTTPException(403, "only an admin may import batches")
        data = await request.body()
        kind = request.headers.get("content-type", "")
        fmt = "json" if "json" in kind else ("csv" if "csv" in kind else None)
        try:
            with sessions.begin() as session:
                result = import_batches(session, data, source=source, actor=user.actor, fmt=fmt,
                                        allow_room_change=allow_room_change)
        except BatchImportError as exc:
            return JSONResponse({"detail": str(exc), "errors": [{"row": e.row, "field": e.field, "problem": e.problem}
                                                                for e in exc.errors]}, status_code=422)
        return JSONResponse({"rows": result.rows, "encoding": result.encoding, "warnings": list(result.warnings),
                             "batches": [{"batch_id": b.batch_id, "action": b.action} for b in result.batches]})

    # ------------------------------------------------------------------ footage

    @app.get("/api/segments/{segment_id}/video", tags=["footage"], response_class=FileResponse,
             responses={200: {"content": {"video/mp4": {}}}, 206: {"description": "partial content"},
                        401: {"description": "not logged in"}, 404: {"description": "no such segment visible"},
                        416: {"description": "range not satisfiable"}})
    def api_video(segment_id: SegmentId, request: Request, user: Auth) -> FileResponse:
        """One stored segment as MP4 (stream copy of the original MPEG-TS), with HTTP range requests."""
        with sessions() as session:
            record = session.get(SegmentRecord, segment_id)
        if (record is None or record.kind != "segment" or not user.may_see(record.institution)
                or record.storage_path is None or record.deleted_at is not None or record.sha256 is None):
            raise HTTPException(404, f"segment {segment_id} not found")
        try:
            if not portal.store.exists(record.storage_path, record.storage_version):
                raise StoredFileMissing(record.storage_path, portal.store)
            mp4 = playable_mp4(portal.store, record.storage_path, record.sha256, portal.cache_dir,
                               record.storage_version)
        except UnsafePath:
            log.error("segment %s: stored path %r leaves storage_dir; not served", segment_id, record.storage_path)
            raise HTTPException(404, f"segment {segment_id}: the stored file is missing") from None
        except StoredFileMissing:
            raise HTTPException(404, f"segment {segment_id}: the stored file is missing") from None
        except subprocess.CalledProcessError as exc:
            log.warning("segment %s: remux failed: %s", segment_id, exc.stderr[-300:] if exc.stderr else exc)
            raise HTTPException(422, f"segment {segment_id} cannot be remuxed for playback") from None
        first = _range_start(request.headers.get("range"))
        if first in (None, 0):   # a new playback, not the continuation of one
            record_view(user, f"{record.venue}/{record.camera}/{record.seq}",
                        {"what": "segment", "segment": record.id})
        return FileResponse(mp4, media_type="video/mp4", filename=f"{record.camera}-{record.seq}.mp4",
                            content_disposition_type="inline")

    # ------------------------------------------------------------------ export

    @app.post("/api/batches/{batch_id}/exports", response_model=ExportOut, tags=["export"],
              responses={401: {"description": "not logged in"}, 404: {"description": "no such batch visible"},
                         422: {"description": "no reason given"}})
    def api_export(batch_id: BatchId, body: ExportBody, user: Auth) -> ExportOut:
        """Write the batch's evidence package (zip) on the collector; download it from `download`."""
        reason = body.reason.strip()
        if not reason:
            raise HTTPException(422, "an export needs a reason")
        with sessions() as session:
            batch = visible_batch(session, user, batch_id)
            institution = batch.institution
        remove_old_exports(portal.exports_dir, timedelta(hours=cfg.http.export_keep_hours))
        export_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}"
        folder = portal.exports_dir / export_id
        settings = ExportSettings(tolerance_seconds=cfg.coverage.gap_tolerance_seconds,
                                  pre_margin_minutes=cfg.coverage.pre_margin_minutes,
                                  post_margin_minutes=cfg.coverage.post_margin_minutes, make_zip=True)
        try:
            result = export_batch(sessions, store=portal.store, key=portal.key, batch_id=batch_id,
                                  out=folder / "package", actor=user.actor, reason=reason, settings=settings,
                                  staging_dir=cfg.staging_dir)
        except BatchNotFound:
            raise HTTPException(404, f"batch {batch_id} not found") from None
        except ExportError as exc:
            raise HTTPException(422, str(exc)) from None
        (folder / "export.json").write_text(json.dumps(
            {"export_id": export_id, "batch_id": batch_id, "institution": institution, "by": user.actor,
             "reason": reason, "zip": result.path.name, "audit_entry": result.audit_seq}, ensure_ascii=False),
            encoding="utf-8")
        return ExportOut(export_id=export_id, batch_id=batch_id, download=f"/api/exports/{export_id}/download",
                         segments=result.segments, bytes=result.bytes, gaps=len(result.gaps),
                         audit_entry=result.audit_seq)

    @app.get("/api/exports/{export_id}/download", tags=["export"], response_class=FileResponse,
             responses={200: {"content": {"application/zip": {}}}, 401: {"description": "not logged in"},
                        404: {"description": "no such export visible"}})
    def api_download(export_id: str, user: Auth) -> FileResponse:
        if not EXPORT_ID_RE.match(export_id):
            raise HTTPException(404, "export not found")
        meta_path = portal.exports_dir / export_id / "export.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise HTTPException(404, "export not found") from None
        if not user.may_see(meta.get("institution")):
            raise HTTPException(404, "export not found")
        record_view(user, meta["batch_id"], {"what": "download", "export_id": export_id}, audit.ACTION_FOOTAGE_EXPORT)
        return FileResponse(portal.exports_dir / export_id / meta["zip"], media_type="application/zip",
                            filename=f"evidence-{meta['batch_id']}-{export_id}.zip")

    # ------------------------------------------------------------------ portal

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise ListenError(f"[http] listen = {listen!r} is not host:port: use e.g. \"127.0.0.1:8080\"")
    return host.strip("[]"), number


class HttpServer:
    """uvicorn on its own thread beside the MQTT service: HTTPS with `[http] cert_file`, else plain HTTP.

    Raises ListenError for an unusable `[http] listen`, TlsFilesError for unusable TLS files. X-Forwarded-For
    and -Proto are believed only with `[http] behind_tls_proxy`, and then only from this host (uvicorn's
    FORWARDED_ALLOW_IPS): otherwise any client could pick the address the login rate limit counts."""

    def __init__(self, portal: Portal, listen: str) -> None:
        import uvicorn

        http = portal.config.http
        host, port = parse_listen(listen)
        self.address = f"{host}:{port}"
        self.url = f"{'https' if http.tls else 'http'}://{self.address}/"
        self.plain_on_network = not http.tls and not is_loopback(host)
        self.server = uvicorn.Server(uvicorn.Config(create_app(portal), host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off",
                                                    proxy_headers=http.behind_tls_proxy, **tls_options(http)))
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def start(self, timeout: float = 15.0) -> None:
        """Start serving; raises ListenError when the address cannot be bound."""
        self.thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout * 20)):
            if self.server.started:
                log.info("HTTP API and portal on %s", self.url)
                if self.plain_on_network:
                    log.warning("HTTP API and portal on %s without TLS: passwords and session tokens cross the "
                                "network in clear; set [http] cert_file and key_file, or listen on 127.0.0.1 behind "
                                "a TLS proxy (behind_tls_proxy = true)", self.url)
                return
            if not self.thread.is_alive():
                break
            deadline.wait(0.05)
        raise ListenError(f"[http] listen = {self.address!r} cannot be served (address in use or not local): "
                          "choose a free host:port")

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)
