"""`exam-collector` commands as an operator runs them: one-line errors, exit codes, summary --verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from collector.cli import main
from collector.config import load_config
from collector.db import make_engine
from collector.ingest import Ingest
from tests.support.services import free_port

from .conftest import AGENT, INSTITUTION, TEST_LIMITS, VENUE, Harness, SigningAgent, payload_bytes

BIN = Path(sys.executable).parent / "exam-collector"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def configured(tmp_path: Path, capsys, database_url: str) -> Path:
    config = tmp_path / "collector.toml"
    code, out, err = run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "data"),
                         "--broker", "mqtt://127.0.0.1:1883", "--database-url", database_url)
    assert code == 0, err
    code, out, err = run(capsys, "--config", str(config), "db", "upgrade")
    assert code == 0, err
    return config


def test_init_writes_config_and_key_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.toml"
    code, out, err = run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "d"))
    assert code == 0 and config.exists() and (tmp_path / "d" / "collector.key").exists()
    assert (tmp_path / "d" / "collector.key").stat().st_mode & 0o777 == 0o600
    cfg = load_config(config)
    assert cfg.storage_dir == tmp_path / "d" / "storage" and cfg.database_url.startswith("sqlite:///")
    code, out, err = run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "d"))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "already exists" in err


def test_enroll_bad_key_is_one_line_exit_1(configured: Path, capsys) -> None:
    code, out, err = run(capsys, "--config", str(configured), "enroll", "--agent", AGENT, "--venue", VENUE,
                         "--institution", INSTITUTION, "--pubkey", "not-a-key!!")
    assert code == 1
    assert err == ("exam-collector: error: --pubkey: public key is not valid base64; pass the line `exam-edge pubkey` "
                   "prints\n")


def test_re_enrol_with_another_key_needs_replace(configured: Path, capsys) -> None:
    first, second = SigningAgent(), SigningAgent()
    base = ["--config", str(configured), "enroll", "--agent", AGENT, "--venue", VENUE, "--institution", INSTITUTION]
    assert run(capsys, *base, "--pubkey", first.pubkey)[0] == 0
    assert run(capsys, *base, "--pubkey", first.pubkey)[0] == 0  # same key: nothing changes
    code, out, err = run(capsys, *base, "--pubkey", second.pubkey)
    assert code == 1 and "--replace" in err and err.count("\n") == 1
    assert run(capsys, *base, "--pubkey", second.pubkey, "--replace")[0] == 0


def test_summary_verify_then_flipped_byte_exits_4(configured: Path, capsys, test_agent: SigningAgent) -> None:
    assert run(capsys, "--config", str(configured), "enroll", "--agent", AGENT, "--venue", VENUE,
               "--institution", INSTITUTION, "--pubkey", test_agent.pubkey)[0] == 0
    cfg = load_config(configured)
    engine = make_engine(cfg.database_url)
    h = Harness(Ingest(engine, cfg.storage_dir, limits=TEST_LIMITS), engine, cfg.storage_dir, test_agent)
    prev = None
    for seq in (1, 2, 4):
        data = payload_bytes(seq)
        m = test_agent.manifest(seq, data, prev if seq != 4 else "cd" * 32)
        assert h.send(m, data).state == "stored"
        prev = m.record_hash()
    gap = test_agent.manifest(5, None, m.record_hash(), kind="gap")
    assert h.send(gap, None).state == "stored"
    engine.dispose()

    code, out, err = run(capsys, "--config", str(configured), "summary", "--verify")
    assert code == 0, out + err
    assert "全部哈希与签名已验证" in out and "理论知识考场" in out and "链缺口 1" in out and "片段 3" in out
    code, out, err = run(capsys, "--config", str(configured), "summary", "--lang", "en", "--json")
    assert code == 0
    [cam] = json.loads(out)["cameras"]
    assert cam["segments"] == 3 and cam["gap_records"] == 1 and cam["missing_seqs"] == [3]
    assert cam["seconds_covered"] == 30.0

    victim = sorted(p for p in cfg.storage_dir.rglob("*.ts"))[1]
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0xFF
    victim.write_bytes(bytes(raw))
    code, out, err = run(capsys, "--config", str(configured), "summary", "--verify", "--lang", "en")
    assert code == 4
    assert "hashes to" in out and victim.name in out and "verified" not in out.splitlines()[-1]

    code, out, err = run(capsys, "--config", str(configured), "events", "--json")
    events = json.loads(out)
    assert {"enrolled", "chain_hole"} <= {e["event"] for e in events}


def test_unreachable_database_exit_2_names_it(tmp_path: Path, capsys) -> None:
    port = free_port()
    config = tmp_path / "c.toml"
    run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "d"),
        "--database-url", f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
    code, out, err = run(capsys, "--config", str(config), "db", "upgrade")
    assert code == 2
    assert err == (f"exam-collector: error: database PostgreSQL 127.0.0.1:{port}/test is unreachable "
                   "(OperationalError): start it or fix [collector] database_url\n")


def test_bad_config_names_the_key(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[collector]\ndata_dir = "/tmp/x"\n[mqtt]\nurl = "http://nope"\n')
    code, out, err = run(capsys, "--config", str(config), "summary")
    assert code == 1
    assert err == ("exam-collector: error: [mqtt] url = 'http://nope' is not an MQTT URL: use mqtt://host:1883 or "
                   "mqtts://host:8883\n")


def test_config_that_is_not_utf8_is_one_line_exit_1(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xff[collector]\n")
    code, out, err = run(capsys, "--config", str(config), "summary")
    assert code == 1
    assert err == (f"exam-collector: error: config file {config} is not UTF-8 text ('utf-8' codec can't decode byte "
                   "0xff in position 0: invalid start byte): save it as UTF-8\n")


@pytest.mark.parametrize("make, reason, fix", [
    (lambda path: None, "No such file or directory", "create it or fix the path"),
    (lambda path: path.mkdir(), "Is a directory", "create it or fix the path"),
    (lambda path: path.write_bytes(b"\xff\xfe\n"), "not UTF-8 text", "save the password in it as UTF-8 text"),
])
def test_unreadable_mqtt_password_file_is_one_line_exit_1(tmp_path: Path, capsys, make, reason: str,
                                                          fix: str) -> None:
    """The collector reads [mqtt] password_file when `serve` builds its MQTT client: a file it cannot read is
    a config error (exit 1, one line), not a traceback."""
    config = tmp_path / "c.toml"
    assert run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "d"))[0] == 0
    assert run(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    config.write_text(config.read_text().replace('# username = "collector-1"',
                                                 'username = "collector-1"\npassword_file = "mqtt.pass"'))
    make(tmp_path / "mqtt.pass")
    code, out, err = run(capsys, "--config", str(config), "serve", "--duration", "1")
    assert code == 1
    password_file = (tmp_path / "mqtt.pass").resolve()
    assert err == (f"exam-collector: error: [mqtt] password_file = '{password_file}' cannot be read ({reason}): "
                   f"{fix}\n")


@pytest.mark.parametrize("problem", ["missing cert", "missing key", "not a certificate"])
def test_unusable_tls_files_stop_serve_with_one_line(tmp_path: Path, capsys, problem: str) -> None:
    """[http] cert_file/key_file are checked when `serve` starts: exit 1, one line naming the key and the fix."""
    from tests.support.deploy_broker import make_test_ca

    config = tmp_path / "c.toml"
    assert run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "d"))[0] == 0
    assert run(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    ca = make_test_ca(tmp_path / "ca")
    cert, key = {"missing cert": (tmp_path / "none.pem", ca.server_key),
                 "missing key": (ca.server_cert, tmp_path / "none.pem"),
                 "not a certificate": (ca.ca_cert.with_name("server.ext"), ca.server_key)}[problem]
    config.write_text(config.read_text().replace('listen = "127.0.0.1:8080"',
                                                 f'listen = "127.0.0.1:{free_port()}"\ncert_file = "{cert}"\n'
                                                 f'key_file = "{key}"'))
    code, out, err = run(capsys, "--config", str(config), "serve", "--duration", "1")
    assert code == 1 and len(err.splitlines()) == 1, err
    if problem.startswith("missing"):
        which = "cert_file" if problem == "missing cert" else "key_file"
        assert err == f"exam-collector: error: [http] {which} = '{tmp_path / 'none.pem'}' does not exist: create it " \
                      "or fix the path\n"
    else:
        assert err.startswith(f"exam-collector: error: [http] cert_file = '{cert}' with key_file = '{key}' cannot be "
                              "used (") and "give the PEM certificate chain in cert_file" in err


@pytest.mark.mosquitto
def test_serve_subprocess(tmp_path: Path, capsys, mosquitto) -> None:
    config = tmp_path / "c.toml"
    run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "d"), "--broker", mosquitto.url)
    run(capsys, "--config", str(config), "db", "upgrade")
    done = subprocess.run([str(BIN), "--config", str(config), "serve", "--duration", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "HTTP API and portal" in done.stderr  # served on [http] listen (issue 6)
    mosquitto.stop()
    done = subprocess.run([str(BIN), "--config", str(config), "serve", "--duration", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (f"exam-collector: error: MQTT broker 127.0.0.1:{mosquitto.port} is "
                                            "unreachable (Connection refused): start it or fix [mqtt] url")


def test_verify_py_verdicts_use_the_shared_exit_codes() -> None:
    """The package's verify.py cannot import exam_contract: its own numbers must stay the shared ones."""
    from collector import evidence_verify as V
    from exam_contract import exitcodes

    assert V.EXIT_CODES == {V.OK: exitcodes.OK, V.OK_WITH_GAPS: exitcodes.GAPS, V.NOT_OK: exitcodes.INTEGRITY}
    assert V.EXIT_INPUT == exitcodes.INPUT
