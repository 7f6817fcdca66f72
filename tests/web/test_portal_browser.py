"""The portal in headless Debian Chromium (Playwright, executable_path), against `exam-collector serve` run
as a subprocess on a free port with a private mosquitto: log in, open a batch, see its gap on the timeline,
play footage from a clicked moment, export with a reason; all of it under the portal's Content-Security-Policy,
with no violation. Then the same portal over HTTPS ([http] cert_file/key_file) with a test CA that Chromium
trusts through its NSS database: the session cookie is Secure, HSTS is sent. Screenshots go to build/screenshots/."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from collector.audit import ACTION_FOOTAGE_EXPORT, ACTION_FOOTAGE_VIEW
from collector.models import AuditEntry
from collector.users import ACTION_USER_LOGIN, ACTION_USER_LOGIN_FAILED
from tests.support.deploy_broker import make_test_ca
from tests.support.footage import Demo, build_demo
from tests.support.services import free_port, wait_for_port

from .conftest import PASSWORD, add_accounts, assert_security_headers

pytestmark = [pytest.mark.ffmpeg, pytest.mark.mosquitto]
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required"]


# Run in the page before its own scripts (Playwright init scripts are not subject to the page's CSP): every
# violation of the Content-Security-Policy is reported on the console, where `watch_csp` collects it.
REPORT_CSP = ("document.addEventListener('securitypolicyviolation', (e) => console.error("
              "`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI} at ${e.sourceFile}:${e.lineNumber}`));")


def need(what: str, present: bool, fix: str) -> None:
    if not present:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{what} is required in CI: {fix}", pytrace=False)
        pytest.skip(f"{what} is not installed ({fix})")


@contextlib.contextmanager
def serve(root: Path, segment_files: list[Path], mqtt_url: str, scheme: str = "http",
          http_extra: str = "") -> Iterator[tuple[str, Demo]]:
    """(base URL, demo) of a real `exam-collector serve` subprocess; stopped on exit."""
    demo = build_demo(root / "demo", f"sqlite:///{root / 'demo' / 'collector.db'}", segment_files)
    add_accounts(demo)
    port = free_port()
    config = demo.write_config(mqtt_url, f"127.0.0.1:{port}", http_extra)
    log = open(root / "serve.log", "wb")
    process = subprocess.Popen([str(BIN / "exam-collector"), "--config", str(config), "serve"], stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        yield f"{scheme}://localhost:{port}" if scheme == "https" else f"http://127.0.0.1:{port}", demo
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        demo.engine.dispose()


@pytest.fixture
def served(tmp_path: Path, segment_files: list[Path], mosquitto):
    with serve(tmp_path, segment_files, mosquitto.url) as found:
        yield found


def watch_csp(page) -> list[str]:
    """The CSP violations the page reports from now on (also Chromium's own "Refused to ..." messages)."""
    violations: list[str] = []
    page.add_init_script(REPORT_CSP)
    page.on("console", lambda m: violations.append(m.text) if (
        "CSP violation" in m.text or "Content Security Policy" in m.text) else None)
    return violations


def cjk_font_installed() -> bool:
    """Without a Chinese font the portal's text renders as boxes and the screenshots show nothing readable."""
    fc_list = shutil.which("fc-list")
    return fc_list is not None and bool(subprocess.run([fc_list, ":lang=zh", "family"], capture_output=True,
                                                        text=True).stdout.strip())


def test_portal_login_timeline_playback_export(served) -> None:
    need("Debian chromium", os.path.exists(CHROMIUM), "make deps installs it")
    need("a CJK font", cjk_font_installed(), "make deps installs fonts-noto-cjk")
    from playwright.sync_api import expect, sync_playwright

    base, demo = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="zh-CN")
            page.on("request", lambda r: requested.append(r.url))
            violations = watch_csp(page)
            responses: dict[str, dict[str, str]] = {}
            page.on("response", lambda r: responses.setdefault(r.url.split("?")[0], r.headers))
            index_page = page.goto(base + "/")
            assert_security_headers(index_page.headers, https=False, what="/")
            expect(page.locator("#login-form")).to_be_visible()
            expect(page.locator("h1")).to_have_text("考试录像监管平台")
            page.fill("#username", "insp-a")
            page.fill("#password", "wrong password")
            page.click("#login-submit")
            expect(page.locator("#login-error")).to_have_text("用户名或密码错误")
            page.fill("#password", PASSWORD)
            page.click("#login-submit")
            rows = page.locator("tr.batch-row")
            expect(rows).to_have_count(2)   # B-OTHER belongs to another institution
            expect(page.locator('tr[data-batch="B-GAP"] .badge')).to_have_text("有覆盖缺口")
            expect(page.locator('tr[data-batch="B-OK"] .badge')).to_have_text("完整")
            page.screenshot(path=str(SHOTS / "1-batches.png"), full_page=True)

            page.click('tr[data-batch="B-GAP"]')
            timeline = page.locator(".timeline").first
            expect(timeline).to_be_visible()
            gaps = timeline.locator('[data-testid="gap"]')
            expect(gaps).to_have_count(2)
            # The outage is 06-10 s of a 16 s window: drawn from 37.5 % to 62.5 % of the bar.
            bar, drawn = timeline.bounding_box(), gaps.nth(0).bounding_box()
            assert abs((drawn["x"] - bar["x"]) / bar["width"] - 0.375) < 0.01
            assert abs(drawn["width"] / bar["width"] - 0.25) < 0.01
            # The frozen segment (12-14 s) is drawn as flagged footage, and listed as a gap with its cause.
            flagged = timeline.locator(".flagged")
            expect(flagged).to_have_count(1)
            assert abs((flagged.bounding_box()["x"] - bar["x"]) / bar["width"] - 0.75) < 0.01
            items = page.locator(".gaplist li")
            expect(items.nth(0)).to_contain_text("2026-11-26 09:00:06 – 09:00:10")
            expect(items.nth(0)).to_contain_text("摄像头不可达")
            expect(items.nth(1)).to_contain_text("09:00:12 – 09:00:14")
            expect(items.nth(1)).to_contain_text("画面冻结")

            # A click in the gap plays nothing and says so.
            timeline.click(position={"x": bar["width"] * 0.5, "y": bar["height"] / 2})
            expect(page.locator("#player-info")).to_contain_text("覆盖缺口")
            # A click at 1 % (09:00:00.16) plays seq 1 from that moment; currentTime advances.
            timeline.click(position={"x": bar["width"] * 0.01, "y": bar["height"] / 2})
            page.wait_for_function("() => { const v = document.querySelector('#player');"
                                   " return v.readyState >= 2 && !v.paused && v.currentTime > 0.2; }", timeout=20000)
            first = page.evaluate("document.querySelector('#player').currentTime")
            page.wait_for_function(f"() => document.querySelector('#player').currentTime > {first} + 0.4",
                                   timeout=20000)
            assert page.evaluate("document.querySelector('#player').error") is None
            expect(page.locator("#player-info")).to_contain_text("序号 1")
            page.screenshot(path=str(SHOTS / "2-batch-playing.png"), full_page=True)

            page.click("#export-button")
            expect(page.locator("#dialog")).to_be_visible()
            page.screenshot(path=str(SHOTS / "3-export-reason.png"))
            page.fill("#export-reason", "浏览器测试：投诉复核")
            page.click("#export-submit")
            expect(page.locator("#export-download")).to_be_visible(timeout=60000)
            href = page.get_attribute("#export-download", "href")
            assert href.startswith("/api/exports/")
            page.screenshot(path=str(SHOTS / "4-exported.png"), full_page=True)

            page.click("#lang")
            expect(page.locator("h1")).to_have_text("Exam footage portal")
            expect(page.locator("#export-button")).to_have_text("Export evidence package")
            page.screenshot(path=str(SHOTS / "5-english.png"), full_page=True)
            assert violations == [], violations
        finally:
            browser.close()

    # The page, its script and style, the API (a failed login included) and the video all came with the headers.
    seen = {url.removeprefix(base) for url in responses}
    assert {"/", "/static/app.js", "/static/app.css", "/api/login", "/api/batches/B-GAP"} <= seen, seen
    assert any(path.endswith("/video") for path in seen), seen
    for url, headers in responses.items():
        assert_security_headers(headers, https=False, what=url)

    # Every asset came from the collector itself (no CDN).
    assert requested and all(u.startswith(base) or u.startswith(("data:", "blob:")) for u in requested), \
        [u for u in requested if not u.startswith(base)]
    with demo.sessions() as s:
        entries = s.scalars(select(AuditEntry).where(AuditEntry.actor == "user:insp-a")).all()
    assert any(e.action == ACTION_FOOTAGE_VIEW and e.target == "B-GAP" for e in entries)
    assert any(e.action == ACTION_FOOTAGE_VIEW and e.target.endswith("/t101-front/1") for e in entries)
    assert [e.reason for e in entries if e.action == ACTION_FOOTAGE_EXPORT] == ["浏览器测试：投诉复核"]
    for name in ("1-batches.png", "2-batch-playing.png", "4-exported.png"):
        assert (SHOTS / name).stat().st_size > 10_000


def test_portal_over_https_with_a_test_ca(tmp_path: Path, segment_files: list[Path], mosquitto) -> None:
    """[http] cert_file/key_file: uvicorn's own TLS, a certificate from a test CA that Chromium trusts (NSS
    database in a private HOME, as an operator's CA would be): login works, the session cookie is Secure and
    HttpOnly, every response has HSTS and the other headers, and the page runs without a CSP violation."""
    need("Debian chromium", os.path.exists(CHROMIUM), "make deps installs it")
    need("certutil (libnss3-tools)", shutil.which("certutil") is not None, "make deps installs it")
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    ca = make_test_ca(tmp_path / "ca")
    home = tmp_path / "home"
    nssdb = f"sql:{home / '.pki' / 'nssdb'}"
    (home / ".pki" / "nssdb").mkdir(parents=True)
    subprocess.run(["certutil", "-d", nssdb, "-N", "--empty-password"], check=True, capture_output=True)
    subprocess.run(["certutil", "-d", nssdb, "-A", "-t", "C,,", "-n", "exam-footage test CA", "-i", str(ca.ca_cert)],
                   check=True, capture_output=True)
    extra = f'cert_file = "{ca.server_cert}"\nkey_file = "{ca.server_key}"\n'
    with serve(tmp_path, segment_files, mosquitto.url, "https", extra) as (base, demo):
        # Outside the browser too: the same CA verifies the server, and errors carry the headers.
        for path in ("/api/me", "/static/missing.js"):
            answer = requests.get(base + path, verify=str(ca.ca_cert), timeout=30)
            assert answer.status_code in (401, 404)
            assert_security_headers(answer.headers, https=True, what=path)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                        env={**os.environ, "HOME": str(home)})
            try:
                context = browser.new_context(locale="zh-CN")
                page = context.new_page()
                violations = watch_csp(page)
                responses: list[tuple[str, dict[str, str]]] = []
                page.on("response", lambda r: responses.append((r.url, r.headers)))
                index_page = page.goto(base + "/")   # an untrusted certificate would fail here (ERR_CERT_...)
                assert index_page is not None and index_page.ok
                assert page.evaluate("window.isSecureContext") is True
                page.fill("#username", "insp-a")
                page.fill("#password", "wrong password")
                page.click("#login-submit")
                expect(page.locator("#login-error")).to_have_text("用户名或密码错误")
                page.fill("#password", PASSWORD)
                page.click("#login-submit")
                expect(page.locator("tr.batch-row")).to_have_count(2)   # fetched with the cookie alone
                cookie = next(c for c in context.cookies() if c["name"] == "exam_session")
                assert cookie["secure"] is True and cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
                page.screenshot(path=str(SHOTS / "6-https.png"), full_page=True)
                assert violations == [], violations
            finally:
                browser.close()
        assert responses and all(url.startswith(base) for url, _ in responses)
        for url, headers in responses:
            assert_security_headers(headers, https=True, what=url)
        assert "HTTP API and portal on https://127.0.0.1:" in (tmp_path / "serve.log").read_text()
        with demo.sessions() as s:
            logins = s.scalars(select(AuditEntry).where(AuditEntry.target == "user:insp-a",
                                                        AuditEntry.action.in_([ACTION_USER_LOGIN,
                                                                               ACTION_USER_LOGIN_FAILED]))
                               .order_by(AuditEntry.seq)).all()
        assert [(e.action, e.reason) for e in logins] == [(ACTION_USER_LOGIN_FAILED, "wrong password"),
                                                          (ACTION_USER_LOGIN, None)]
