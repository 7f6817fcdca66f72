"""Collector config: defaults and errors that name the key and the fix."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from collector.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[collector]\ndata_dir = "data"\n[mqtt]\nurl = "mqtts://broker.example.cn"\n'))
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.storage_dir == tmp_path / "data" / "storage"
    assert cfg.database_url == f"sqlite:///{tmp_path / 'data' / 'collector.db'}"
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls) == ("broker.example.cn", 8883, True)
    assert cfg.coverage.gap_tolerance_seconds == 2 and cfg.retention.unlinked_retention_days is None
    assert (cfg.http.cert_file, cfg.http.key_file, cfg.http.tls, cfg.http.https) == (None, None, False, False)
    assert (cfg.http.login_failures_per_account, cfg.http.login_failures_per_address,
            cfg.http.login_window_seconds) == (5, 20, 300)


def test_http_tls_and_login_limits(tmp_path: Path) -> None:
    """[http] cert_file/key_file are paths relative to the config (checked by `serve`, which reads them);
    behind_tls_proxy alone also makes the portal HTTPS for cookies and HSTS."""
    base = '[collector]\ndata_dir = "d"\n[mqtt]\nurl = "mqtt://h"\n[http]\n'
    cfg = load_config(write(tmp_path, base + 'cert_file = "tls/cert.pem"\nkey_file = "tls/key.pem"\n'
                                            'login_failures_per_account = 3\nlogin_window_seconds = 60\n'))
    assert (cfg.http.cert_file, cfg.http.key_file) == (tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem")
    assert cfg.http.tls and cfg.http.https and not cfg.http.behind_tls_proxy
    assert (cfg.http.login_failures_per_account, cfg.http.login_window_seconds) == (3, 60)
    proxied = load_config(write(tmp_path, base + "behind_tls_proxy = true\n")).http
    assert proxied.https and not proxied.tls


@pytest.mark.parametrize("text, needle", [
    ('[mqtt]\nurl = "mqtt://h"\n', "[collector] table is missing"),
    ('[collector]\n[mqtt]\nurl = "mqtt://h"\n', "[collector] data_dir is missing"),
    ('[collector]\ndata_dir = "d"\n', "[mqtt] table is missing"),
    ('[collector]\ndata_dir = "d"\n[mqtt]\nurl = "ftp://h"\n', "[mqtt] url"),
    ('[collector]\ndata_dir = "d"\ndatabase_url = "mysql://x"\n[mqtt]\nurl = "mqtt://h"\n', "[collector] database_url"),
    ('[collector]\ndata_dir = "d"\n[mqtt]\nurl = "mqtt://h"\n[coverage]\npre_margin_minutes = -1\n',
     "[coverage] pre_margin_minutes = -1 is out of range"),
    ('[collector\n', "not valid TOML"),
    ('[collector]\ndata_dir = "d"\n[mqtt]\nurl = "mqtt://h"\n[http]\nkey_file = "k.pem"\n',
     "[http] key_file is set without cert_file: set cert_file = "),
    ('[collector]\ndata_dir = "d"\n[mqtt]\nurl = "mqtt://h"\n[http]\nbehind_tls_proxy = "yes"\n',
     "[http] behind_tls_proxy = 'yes' must be true or false"),
    ('[collector]\ndata_dir = "d"\n[mqtt]\nurl = "mqtt://h"\n[http]\nlogin_failures_per_account = 0\n',
     "[http] login_failures_per_account = 0 is out of range 1..1000"),
    ('[collector]\ndata_dir = "d"\n[mqtt]\nurl = "mqtt://h"\n[http]\ncert = "c.pem"\n',
     "[http] cert is not a known key; did you mean cert_file?"),
    ('[collector]\ndata_dir = "d"\n[mqtt]\nurl = "mqtt://h"\n[http]\ncolour = "red"\n',
     "[http] colour is not a known key: remove it"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert needle in str(info.value) and (":" in str(info.value) or "; did you mean " in str(info.value))


def test_default_client_id_is_stable_per_key_and_host_and_not_guessable(tmp_path: Path, monkeypatch) -> None:
    """Without [mqtt] client_id: `{username}-{HMAC(key file, hostname)}`, not the old `exam-collector-{username}`
    that anyone could use to take over the collector's session."""
    text = ('[collector]\ndata_dir = "data"\nkey_file = "collector.key"\n'
            '[mqtt]\nurl = "mqtts://broker.example.cn"\nusername = "collector-1"\n')
    key = tmp_path / "collector.key"
    key.write_bytes(b"first private key")
    first = load_config(write(tmp_path, text)).mqtt.client_id
    assert first != "exam-collector-collector-1" and first.startswith("collector-1-") and len(first) == 12 + 16
    assert load_config(write(tmp_path, text)).mqtt.client_id == first  # the same after a restart
    monkeypatch.setattr(socket, "gethostname", lambda: "another-host")
    assert load_config(write(tmp_path, text)).mqtt.client_id not in (first, "exam-collector-collector-1")
    monkeypatch.undo()
    key.write_bytes(b"second private key")
    assert load_config(write(tmp_path, text)).mqtt.client_id not in (first, "exam-collector-collector-1")
    key.unlink()  # no key (`serve` refuses to start then): a random suffix, still not the old id
    assert load_config(write(tmp_path, text)).mqtt.client_id not in (first, "exam-collector-collector-1")
    configured = load_config(write(tmp_path, text + 'client_id = "collector-east"\n'))
    assert configured.mqtt.client_id == "collector-east"
