"""Collector config: defaults and errors that name the key and the fix."""

from __future__ import annotations

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


@pytest.mark.parametrize("text, needle", [
    ('[mqtt]\nurl = "mqtt://h"\n', "[collector] table is missing"),
    ('[collector]\n[mqtt]\nurl = "mqtt://h"\n', "[collector] data_dir is missing"),
    ('[collector]\ndata_dir = "d"\n', "[mqtt] table is missing"),
    ('[collector]\ndata_dir = "d"\n[mqtt]\nurl = "ftp://h"\n', "[mqtt] url"),
    ('[collector]\ndata_dir = "d"\ndatabase_url = "mysql://x"\n[mqtt]\nurl = "mqtt://h"\n', "[collector] database_url"),
    ('[collector]\ndata_dir = "d"\n[mqtt]\nurl = "mqtt://h"\n[coverage]\npre_margin_minutes = -1\n',
     "[coverage] pre_margin_minutes = -1 is out of range"),
    ('[collector\n', "not valid TOML"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert needle in str(info.value) and ":" in str(info.value)
