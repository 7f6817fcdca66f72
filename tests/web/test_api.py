"""HTTP API on real footage and a real database (SQLite and PostgreSQL): authentication, authorization by
institution, range playback of remuxed MP4, export and download, and the audit trail of all of it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from collector.audit import ACTION_FOOTAGE_EXPORT, ACTION_FOOTAGE_VIEW
from collector.evidence_verify import OK_WITH_GAPS, verify_package
from collector.models import AuditEntry, SegmentRecord
from collector.users import check_password, hash_password, login
from tests.support.footage import SITE_A, SITE_B, Demo

from .conftest import PASSWORD, token_for

pytestmark = pytest.mark.ffmpeg
BIN = Path(sys.executable).parent


def segment_ids(demo: Demo, institution: str) -> list[int]:
    with demo.sessions() as s:
        return list(s.scalars(select(SegmentRecord.id).where(SegmentRecord.institution == institution,
                                                             SegmentRecord.kind == "segment")
                              .order_by(SegmentRecord.seq)))


def audit_entries(demo: Demo, actor: str) -> list[tuple[str, str, dict]]:
    with demo.sessions() as s:
        rows = s.scalars(select(AuditEntry).where(AuditEntry.actor == actor).order_by(AuditEntry.seq)).all()
    return [(r.action, r.target, json.loads(r.detail)) for r in rows]


def test_unauthenticated_requests_get_401(client, web_demo: Demo) -> None:
    seg = segment_ids(web_demo, SITE_A.institution)[0]
    for method, path in [("get", "/api/me"), ("get", "/api/batches"), ("get", "/api/batches/B-OK"),
                         ("get", "/api/batches/B-OK/coverage"), ("get", f"/api/segments/{seg}/video"),
                         ("post", "/api/batches/B-OK/exports"), ("get", "/api/exports/20261127T000000Z-abcdef/download"),
                         ("post", "/api/batches/import"), ("post", "/api/logout")]:
        response = client.request(method, path, json={"reason": "x"} if method == "post" else None)
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.headers["www-authenticate"] == "Bearer"
    bad = client.get("/api/batches", headers={"Authorization": "Bearer not-a-token"})
    assert bad.status_code == 401
    assert client.post("/api/login", json={"username": "insp-a", "password": "wrong password"}).status_code == 401
    assert client.post("/api/login", json={"username": "nobody", "password": PASSWORD}).status_code == 401


def test_expired_session_is_refused(client, web_demo: Demo) -> None:
    expired = login(web_demo.sessions, "insp-a", PASSWORD, client="test", hours=-1)
    response = client.get("/api/me", headers={"Authorization": f"Bearer {expired.token}"})
    assert response.status_code == 401 and "expired" in response.json()["detail"]
    assert check_password("s3cret-pass", hash_password("s3cret-pass"))
    assert hash_password("s3cret-pass").startswith("scrypt$") and not check_password("x", hash_password("y"))


def test_inspector_sees_only_their_institution(client, web_demo: Demo) -> None:
    a = token_for(client, "insp-a")
    listed = client.get("/api/batches", headers=a).json()
    assert sorted(b["batch_id"] for b in listed) == ["B-GAP", "B-OK"]
    assert {b["batch_id"]: b["status"] for b in listed} == {"B-GAP": "gaps", "B-OK": "complete"}
    # Asking for the other institution explicitly gives nothing either.
    assert client.get("/api/batches", headers=a, params={"institution": SITE_B.institution}).json() == []
    for path in ["/api/batches/B-OTHER", "/api/batches/B-OTHER/coverage"]:
        assert client.get(path, headers=a).status_code == 404
    other_segments = segment_ids(web_demo, SITE_B.institution)
    for seg in other_segments:
        assert client.get(f"/api/segments/{seg}/video", headers=a).status_code == 404
    assert client.post("/api/batches/B-OTHER/exports", headers=a, json={"reason": "curious"}).status_code == 404
    # An export of B made by the admin cannot be downloaded by A's inspector, but by B's.
    admin = token_for(client, "admin")
    made = client.post("/api/batches/B-OTHER/exports", headers=admin, json={"reason": "case 9"}).json()
    assert client.get(made["download"], headers=a).status_code == 404
    assert client.get(made["download"], headers=token_for(client, "insp-b")).status_code == 200
    assert sorted(b["batch_id"] for b in client.get("/api/batches", headers=admin).json()) == ["B-GAP", "B-OK",
                                                                                               "B-OTHER"]
    # Nothing A tried against B reached the audit log as a view or export.
    assert [e for e in audit_entries(web_demo, "user:insp-a") if "OTHER" in e[1] or SITE_B.venue in e[1]] == []


def test_batch_filters(client, web_demo: Demo) -> None:
    admin = token_for(client, "admin")

    def ids(**params: str) -> list[str]:
        response = client.get("/api/batches", headers=admin, params=params)
        assert response.status_code == 200, response.text
        return sorted(b["batch_id"] for b in response.json())

    assert ids(institution=SITE_A.institution) == ["B-GAP", "B-OK"]
    assert ids(venue=SITE_B.venue) == ["B-OTHER"]
    assert ids(date="2026-11-26") == ["B-GAP", "B-OK", "B-OTHER"]
    assert ids(date="2026-11-25") == []
    assert ids(status="gaps") == ["B-GAP"]
    assert client.get("/api/batches", headers=admin, params={"status": "bogus"}).status_code == 422
    assert client.get("/api/batches", headers=admin, params={"date": "26.11.2026"}).status_code == 422


def test_views_playback_export_and_download_are_audited(client, web_demo: Demo, tmp_path: Path) -> None:
    a = token_for(client, "insp-a")
    batch = client.get("/api/batches/B-GAP", headers=a).json()
    cam = batch["parts"][0]["cameras"][0]
    assert cam["camera"] == SITE_A.camera and [s["seq"] for s in cam["segments"]] == [1, 2, 3, 5, 6, 7]
    assert [(g["start_local"], g["end_local"], g["causes"]) for g in cam["gaps"]] == [
        ("2026-11-26T09:00:06+08:00", "2026-11-26T09:00:10+08:00", ["camera_unreachable"]),
        ("2026-11-26T09:00:12+08:00", "2026-11-26T09:00:14+08:00", ["health_frozen"])]
    assert [s["health"] for s in cam["segments"]] == [[], [], [], [], ["frozen"], []]
    assert client.get("/api/batches/B-GAP/coverage", headers=a).json()["status"] == "gaps"

    seg = cam["segments"][1]
    whole = client.get(f"/api/segments/{seg['id']}/video", headers=a)
    assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
    assert whole.content[4:8] == b"ftyp" and whole.headers["accept-ranges"] == "bytes"
    part = client.get(f"/api/segments/{seg['id']}/video", headers={**a, "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(whole.content)}"
    assert client.get(f"/api/segments/{seg['id']}/video",
                      headers={**a, "Range": f"bytes={len(whole.content) + 10}-"}).status_code == 416
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name", "-of", "csv=p=0", "-"],
                           input=whole.content, capture_output=True, check=True)
    assert probe.stdout.decode().strip() == "h264"

    made = client.post("/api/batches/B-GAP/exports", headers=a, json={"reason": "复核 case 21"})
    assert made.status_code == 200, made.text
    assert made.json()["gaps"] == 2 and made.json()["segments"] == 6
    zipped = client.get(made.json()["download"], headers=a)
    assert zipped.status_code == 200 and zipped.headers["content-type"] == "application/zip"
    target = tmp_path / "download.zip"
    target.write_bytes(zipped.content)
    assert zipfile.is_zipfile(io.BytesIO(zipped.content))
    assert verify_package(target).verdict == OK_WITH_GAPS
    assert client.post("/api/batches/B-GAP/exports", headers=a, json={"reason": ""}).status_code == 422

    entries = audit_entries(web_demo, "user:insp-a")
    actions = [(action, target, detail.get("what")) for action, target, detail in entries]
    venue_cam = f"{SITE_A.venue}/{SITE_A.camera}/{seg['seq']}"
    assert (ACTION_FOOTAGE_VIEW, "B-GAP", "batch") in actions
    assert (ACTION_FOOTAGE_VIEW, "B-GAP", "coverage") in actions
    # The whole-file and the first-byte requests are new playbacks; ranges that continue one are not.
    assert actions.count((ACTION_FOOTAGE_VIEW, venue_cam, "segment")) == 1
    exports = [(t, d) for act, t, d in entries if act == ACTION_FOOTAGE_EXPORT]
    assert [t for t, _ in exports] == ["B-GAP", "B-GAP"] and exports[1][1]["what"] == "download"
    with web_demo.sessions() as s:
        export_entry = s.scalars(select(AuditEntry).where(AuditEntry.action == ACTION_FOOTAGE_EXPORT,
                                                          AuditEntry.actor == "user:insp-a")).first()
    assert export_entry.reason == "复核 case 21"


def test_import_endpoint_admin_only(client, web_demo: Demo) -> None:
    csv = ("batch_id,institution,venue,occupation,level,part,room,start,end\n"
           f"B-NEW,{SITE_A.institution},{SITE_A.venue},电工,四级,theory,T101,2026-11-27T09:00:00,2026-11-27T10:00:00\n")
    a = token_for(client, "insp-a")
    assert client.post("/api/batches/import", headers={**a, "Content-Type": "text/csv"},
                       content=csv.encode()).status_code == 403
    admin = token_for(client, "admin")
    done = client.post("/api/batches/import", headers={**admin, "Content-Type": "text/csv"}, content=csv.encode())
    assert done.status_code == 200 and done.json()["batches"] == [{"batch_id": "B-NEW", "action": "created"}]
    bad = client.post("/api/batches/import", headers={**admin, "Content-Type": "text/csv"}, content=b"nonsense\n1\n")
    assert bad.status_code == 422 and bad.json()["errors"]
    assert "B-NEW" in [b["batch_id"] for b in client.get("/api/batches", headers=a).json()]


def test_users_add_cli(web_demo: Demo) -> None:
    config = web_demo.write_config()
    cli = [str(BIN / "exam-collector"), "--config", str(config), "users", "add"]
    done = subprocess.run(cli + ["insp-c", "--role", "inspector", "--institution", "JL2203003"],
                          input="another pass 1\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "insp-c (inspector) created" in done.stdout, done.stderr
    again = subprocess.run(cli + ["insp-c", "--role", "inspector", "--institution", "JL2203003"],
                           input="another pass 1\n", capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already exists" in again.stderr
    none = subprocess.run(cli + ["insp-d", "--role", "inspector"], input="another pass 1\n",
                          capture_output=True, text=True, timeout=60)
    assert none.returncode == 1 and "--institution" in none.stderr and len(none.stderr.splitlines()) == 1
    assert login(web_demo.sessions, "insp-c", "another pass 1", client="test").user.institutions == ("JL2203003",)


def test_hostile_inputs_are_4xx_not_5xx(client, web_demo: Demo) -> None:
    """NUL bytes (which PostgreSQL refuses), huge ids, odd encodings: each answered 4xx on both databases."""
    admin = token_for(client, "admin")
    for path, params in [("/api/batches/B%00X", None), ("/api/batches/B%00X/coverage", None),
                         ("/api/segments/99999999999999999999999/video", None), ("/api/segments/-1/video", None),
                         ("/api/batches", {"institution": "A\x00"}), ("/api/batches", {"venue": "\x00"}),
                         ("/api/exports/..%2F..%2Fetc/download", None)]:
        response = client.get(path, headers=admin, params=params)
        assert 400 <= response.status_code < 500, (path, response.status_code)
    assert client.post("/api/login", json={"username": "a\x00b", "password": "x"}).status_code == 422
    assert client.post("/api/batches/B%00/exports", headers=admin, json={"reason": "r"}).status_code == 422
    weird = client.post("/api/batches/import", headers={**admin, "Content-Type": "application/json"},
                        content="\ufeff[{\"batch_id\": {\"x\": 1}}]".encode("utf-16"))
    assert weird.status_code == 422
    chinese = client.get("/api/batches/批次-不存在", headers=admin)
    assert chinese.status_code == 404


def test_http_exports_are_removed_after_export_keep_hours(client, web_demo: Demo) -> None:
    """Downloadable packages do not pile up in data_dir/exports: a new export removes those older than
    [http] export_keep_hours (72 by default); their audit entries stay."""
    import os
    import time

    a = token_for(client, "insp-a")
    first = client.post("/api/batches/B-GAP/exports", headers=a, json={"reason": "case 30"}).json()
    exports_dir = web_demo.root / "data" / "exports"
    old = exports_dir / first["export_id"]
    assert (old / "export.json").is_file()
    four_days_ago = time.time() - 4 * 24 * 3600
    os.utime(old / "export.json", (four_days_ago, four_days_ago))
    second = client.post("/api/batches/B-GAP/exports", headers=a, json={"reason": "case 31"}).json()
    assert not old.exists() and (exports_dir / second["export_id"] / "export.json").is_file()
    assert client.get(first["download"], headers=a).status_code == 404
    assert client.get(second["download"], headers=a).status_code == 200
    with web_demo.sessions() as s:
        reasons = s.scalars(select(AuditEntry.reason).where(AuditEntry.actor == "user:insp-a",
                                                            AuditEntry.action == ACTION_FOOTAGE_EXPORT)).all()
    assert {"case 30", "case 31"} <= set(reasons)
