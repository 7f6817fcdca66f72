"""schemathesis against the OpenAPI schema of a real `exam-collector serve` (subprocess, free port, private
mosquitto), authenticated as an admin and as nobody: no request may end in a 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.support.footage import build_demo, ffmpeg_ok, make_segments
from tests.support.services import Mosquitto, free_port, mosquitto_binary, wait_for_port

from .conftest import PASSWORD, add_accounts

pytestmark = [pytest.mark.ffmpeg, pytest.mark.mosquitto]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    if mosquitto_binary() is None or not ffmpeg_ok():
        pytest.skip("mosquitto and ffmpeg are needed")
    root = tmp_path_factory.mktemp("schema")
    broker = Mosquitto(workdir=root / "mosquitto")
    broker.start()
    demo = build_demo(root / "demo", f"sqlite:///{root / 'demo' / 'collector.db'}", make_segments(root / "lavfi"))
    add_accounts(demo)
    port = free_port()
    config = demo.write_config(broker.url, f"127.0.0.1:{port}")
    log = open(root / "serve.log", "wb")
    process = subprocess.Popen([str(BIN / "exam-collector"), "--config", str(config), "serve"], stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        base = f"http://127.0.0.1:{port}"
        token = requests.post(f"{base}/api/login", json={"username": "admin", "password": PASSWORD},
                              timeout=30).json()["token"]
        yield base, {"Authorization": f"Bearer {token}"}, root / "serve.log"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        broker.stop(kill=True)
        demo.engine.dispose()


def test_no_server_errors(server) -> None:
    """Every operation of the schema, fuzzed (positive and negative data), as admin and unauthenticated.
    Driven through hypothesis directly: schemathesis' pytest plugin does not load under pytest 9."""
    from hypothesis import given

    base, headers, log = server
    api = schemathesis.openapi.from_url(f"{base}/openapi.json")
    failures: list[str] = []
    labels: list[str] = []
    calls = 0
    for result in api.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:
            nonlocal calls
            for auth in (headers, {}):
                response = case.call(base_url=base, headers=auth, timeout=60)
                calls += 1
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} {case.query}: {response.status_code}")
                case.validate_response(response, checks=[not_a_server_error], headers=auth)

        fuzz()
    assert {"POST /api/login", "GET /api/batches", "GET /api/batches/{batch_id}", "GET /api/segments/{segment_id}/video",
            "POST /api/batches/{batch_id}/exports", "GET /api/exports/{export_id}/download",
            "POST /api/batches/import"} <= set(labels)
    assert calls > 100 and failures == [], f"{failures}; see {log}"
