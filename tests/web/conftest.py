"""Fixtures for the HTTP API and portal: real footage (tests/support/footage.py), accounts, the app."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.config import load_config
from collector.users import add_user
from collector.web import Portal, create_app
from exam_contract.signing import load_private_key
from tests.support.footage import SITE_A, SITE_B, Demo, build_demo, make_segments

PASSWORD = "correct horse 9"
USERS = {"insp-a": ("inspector", [SITE_A.institution]), "insp-b": ("inspector", [SITE_B.institution]),
         "admin": ("admin", [])}


@pytest.fixture(scope="session")
def segment_files(tmp_path_factory: pytest.TempPathFactory, ffmpeg_available: None) -> list[Path]:
    return make_segments(tmp_path_factory.mktemp("lavfi"))


def add_accounts(demo: Demo) -> None:
    for name, (role, institutions) in USERS.items():
        add_user(demo.sessions, name, PASSWORD, role, institutions, actor="test-setup")


@pytest.fixture
def web_demo(tmp_path: Path, segment_files: list[Path], database_url: str) -> Demo:
    demo = build_demo(tmp_path / "demo", database_url, segment_files)
    add_accounts(demo)
    yield demo
    demo.engine.dispose()


@pytest.fixture
def client(web_demo: Demo):
    from fastapi.testclient import TestClient

    config = load_config(web_demo.write_config())
    app = create_app(Portal(config, web_demo.sessions, load_private_key(web_demo.key_file)))
    with TestClient(app) as c:
        yield c


def assert_security_headers(headers, https: bool, what: str = "") -> None:
    """The headers of collector/http_security.py on one response (any mapping with case-insensitive get)."""
    csp = headers.get("content-security-policy") or ""
    directives = dict((d.strip().split(" ", 1) + [""])[:2] for d in csp.split(";") if d.strip())
    assert directives.get("default-src") == "'self'" and directives.get("script-src") == "'self'", (what, csp)
    assert directives.get("style-src") == "'self'" and directives.get("frame-ancestors") == "'none'", (what, csp)
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp, (what, csp)
    assert headers.get("x-frame-options") == "DENY", what
    assert headers.get("x-content-type-options") == "nosniff", what
    assert headers.get("referrer-policy") == "no-referrer", what
    hsts = headers.get("strict-transport-security")
    assert (hsts is not None and hsts.startswith("max-age=")) if https else hsts is None, (what, hsts)


def token_for(client, username: str) -> dict[str, str]:
    response = client.post("/api/login", json={"username": username, "password": PASSWORD})
    assert response.status_code == 200, response.text
    client.cookies.clear()   # each request below authenticates only by the header it passes
    return {"Authorization": f"Bearer {response.json()['token']}"}
