"""Strict configs (issue 14): every table and the top level of the collector config refuse unknown keys, naming the
nearest valid one, with exit 1 from any command; the `init` template suggests no value a command refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from collector.cli import main as collector_main
from collector.config import (ALERTS_KEYS, COLLECTOR_KEYS, COVERAGE_KEYS, HTTP_KEYS, INGEST_KEYS, RETENTION_KEYS,
                              SECTIONS, STORAGE_KEYS, load_config)
from edge_agent.config import load_config as load_edge_config
from exam_contract.tomlconfig import ConfigError
from retention.cli import main as retention_main
from retention.policy import RetentionPolicy

BASE = '[collector]\ndata_dir = "data"\n[mqtt]\nurl = "mqtt://127.0.0.1:1"\n'


def run(capsys, main, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def with_line(table: str, line: str) -> str:
    """BASE with `line` added to `table` (appended as a new table when BASE has none)."""
    header = f"[{table}]\n"
    if header in BASE:
        return BASE.replace(header, header + line + "\n", 1)
    return BASE + header + line + "\n"


@pytest.mark.parametrize("table, line, command, expected", [
    ("collector", 'databse_url = "postgresql+psycopg://x@h/db"', ["summary"],
     "[collector] databse_url is not a known key; did you mean database_url?"),
    ("mqtt", 'usrname = "collector-1"', ["events"], "[mqtt] usrname is not a known key; did you mean username?"),
    ("http", 'listne = "127.0.0.1:8080"', ["serve", "--duration", "0"],
     "[http] listne is not a known key; did you mean listen?"),
    ("coverage", "gap_tolerance_second = 3", ["batches", "list"],
     "[coverage] gap_tolerance_second is not a known key; did you mean gap_tolerance_seconds?"),
    ("alerts", 'webhook = "https://ops.example.cn/h"', ["keys"],
     "[alerts] webhook is not a known key; did you mean webhook_url?"),
    ("retention", "unlinked_retention = 400", ["hold", "list"],
     "[retention] unlinked_retention is not a known key; did you mean unlinked_retention_days?"),
    ("storage", 'backnd = "filesystem"', ["db", "upgrade"],
     "[storage] backnd is not a known key; did you mean backend?"),
    ("ingest", "max_segment = 10", ["users", "list"],
     "[ingest] max_segment is not a known key; did you mean max_segment_mb?"),
    ("collector", "colour = 1", ["summary"],
     "[collector] colour is not a known key: remove it (known: data_dir, database_url, finishers, key_file, "
     "queue_size, staging_ttl_hours, storage_dir, workers)"),
])
def test_a_typo_in_each_table_exits_1_naming_the_nearest_key(tmp_path: Path, capsys, table: str, line: str,
                                                              command: list[str], expected: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(with_line(table, line))
    code, out, err = run(capsys, collector_main, "--config", str(config), *command)
    assert (code, out, err) == (1, "", f"exam-collector: error: {expected}\n")


@pytest.mark.parametrize("text, expected", [
    (BASE + "[retension]\nmargin_days = 7\n", "[retension] is not a known section; did you mean [retention]?"),
    (BASE + "[portal]\nlisten = \"x\"\n",
     "[portal] is not a known section: remove it (known: [alerts], [collector], [coverage], [http], [ingest], "
     "[mqtt], [retention], [storage])"),
    ('database_url = "sqlite:///x.db"\n' + BASE,
     "database_url is not a known key at the top level: move it under its section ([alerts], [collector], "
     "[coverage], [http], [ingest], [mqtt], [retention], [storage]) or remove it"),
])
def test_unknown_sections_and_top_level_keys_exit_1(tmp_path: Path, capsys, text: str, expected: str) -> None:
    """Also from exam-retention, which reads the same config."""
    config = tmp_path / "c.toml"
    config.write_text(text)
    assert run(capsys, collector_main, "--config", str(config), "summary") == \
        (1, "", f"exam-collector: error: {expected}\n")
    assert run(capsys, retention_main, "--config", str(config), "enforce", "--dry-run") == \
        (1, "", f"exam-retention: error: {expected}\n")


def test_the_known_key_sets_are_what_the_loader_reads(tmp_path: Path) -> None:
    """Every key of every known set loads (none is refused as unknown): the sets and the loader agree."""
    values = {"data_dir": '"data"', "database_url": '"sqlite:///x.db"', "storage_dir": '"s"', "key_file": '"k"',
              "workers": "2", "finishers": "3", "queue_size": "100", "staging_ttl_hours": "48",
              "url": '"mqtts://h"', "username": '"u"', "password_file": '"p"', "ca_file": '"ca.pem"',
              "cert_file": '"c.pem"', "key_file@mqtt": '"k.pem"', "client_id": '"c"',
              "listen": '"127.0.0.1:1"', "export_keep_hours": "72", "cert_file@http": '"c.pem"',
              "key_file@http": '"k.pem"', "behind_tls_proxy": "false", "login_failures_per_account": "5",
              "login_failures_per_address": "20", "login_window_seconds": "300",
              "pre_margin_minutes": "15", "post_margin_minutes": "15", "gap_tolerance_seconds": "2",
              "webhook_url": '"https://h/x"', "interval_seconds": "5",
              "margin_days": "7", "unlinked_retention_days": "400",
              "backend": '"s3"', "endpoint": '"https://s3.example.cn"', "bucket": '"exam-footage"',
              "region": '"r"', "addressing": '"path"', "credentials_file": '"s3.cred"', "ca_file@storage": '"ca"',
              "longest_exam_day_hours": "24",
              "max_segment_mb": "4096", "min_chunk_kb": "64", "max_chunk_kb": "1024", "max_open_transfers": "32",
              "max_staging_mb": "8192", "max_early_chunks": "256", "clock_future_minutes": "10",
              "clock_backlog_days": "30"}
    from exam_contract.mqtt import FILE_KEYS

    tables = {"collector": COLLECTOR_KEYS, "mqtt": {"url", "username", "client_id", *FILE_KEYS}, "http": HTTP_KEYS,
              "coverage": COVERAGE_KEYS, "alerts": ALERTS_KEYS, "retention": RETENTION_KEYS,
              "storage": STORAGE_KEYS, "ingest": INGEST_KEYS}
    assert set(tables) == SECTIONS
    text = ""
    for table, keys in tables.items():
        text += f"[{table}]\n" + "".join(f"{key} = {values.get(f'{key}@{table}', values.get(key))}\n"
                                         for key in sorted(keys))
    path = tmp_path / "c.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.storage.backend == "s3" and cfg.retention.unlinked_retention_days == 400


def test_edge_config_names_the_nearest_key_in_each_table(tmp_path: Path) -> None:
    good = ('[agent]\nid = "a"\ninstitution = "I"\nvenue = "V"\ndata_dir = "d"\nkey_file = "k"\n'
            '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n[recording]\nsegment_seconds = 60\n[health]\nenabled = true\n'
            '[[camera]]\nid = "c1"\nroom = "T1"\nroom_kind = "theory"\nsource = "lavfi:testsrc2"\n')
    path = tmp_path / "edge.toml"
    path.write_text(good)
    load_edge_config(path)
    for old, new, expected in [
        ('data_dir = "d"', 'datadir = "d"', "[agent] datadir is not a known key; did you mean data_dir?"),
        ('url = "mqtt://127.0.0.1:1"', 'url = "mqtt://127.0.0.1:1"\npasword_file = "p"',
         "[mqtt] pasword_file is not a known key; did you mean password_file?"),
        ("segment_seconds = 60", "segment_second = 60",
         "[recording] segment_second is not a known key; did you mean segment_seconds?"),
        ("enabled = true", "enable = true", "[health] enable is not a known key; did you mean enabled?"),
        ('room = "T1"', 'rom = "T1"', "[camera #1] rom is not a known key; did you mean room?"),
        ("[recording]", "[recordings]", "[recordings] is not a known section; did you mean [recording]?"),
    ]:
        path.write_text(good.replace(old, new, 1))
        with pytest.raises(ConfigError) as info:
            load_edge_config(path)
        assert str(info.value) == expected


COMMENTED_OPTION = re.compile(r"^#\s*([a-z_]+)\s*=\s*(.*)$")
HEADER = re.compile(r"^\[([a-z]+)\]")


def uncomment_every_option(text: str) -> tuple[str, list[str]]:
    """The template with every commented `key = value` line of a real option of its table uncommented (a value
    that replaces an uncommented one of the same key, like the alternative [storage] backend, replaces it)."""
    tables = {"collector": COLLECTOR_KEYS, "mqtt": {"url", "username", "client_id", "password_file", "ca_file",
                                                    "cert_file", "key_file"},
              "http": HTTP_KEYS, "coverage": COVERAGE_KEYS, "alerts": ALERTS_KEYS, "retention": RETENTION_KEYS,
              "storage": STORAGE_KEYS, "ingest": INGEST_KEYS}
    out: list[str] = []
    where: dict[tuple[str, str], int] = {}
    table = ""
    uncommented: list[str] = []
    for line in text.splitlines():
        header = HEADER.match(line)
        if header:
            table = header.group(1)
        match = COMMENTED_OPTION.match(line)
        if match and match.group(1) in tables.get(table, ()):
            line = f"{match.group(1)} = {match.group(2)}"
            uncommented.append(f"[{table}] {match.group(1)}")
            previous = where.get((table, match.group(1)))
            if previous is not None:
                out[previous] = "# (replaced by the alternative below)"
        elif not line.startswith("#") and "=" in line and table:
            where[(table, line.split("=", 1)[0].strip())] = len(out)
        out.append(line)
    return "\n".join(out) + "\n", uncommented


def test_init_template_suggests_only_values_the_commands_accept(tmp_path: Path, capsys) -> None:
    """`init`'s config with every commented option uncommented loads, and what validates the values beyond the
    loader (the retention policy of `exam-retention enforce`) takes them. The template once suggested
    `unlinked_retention_days = 90`, which enforce refuses."""
    config = tmp_path / "collector.toml"
    # mqtts: the template's commented ca_file is "for mqtts://"
    assert run(capsys, collector_main, "--config", str(config), "init", "--data-dir", str(tmp_path / "data"),
               "--broker", "mqtts://broker.example.cn:8883")[0] == 0
    text, uncommented = uncomment_every_option(config.read_text())
    # the test must actually reach the suggestions it is about
    assert {"[retention] unlinked_retention_days", "[http] cert_file", "[mqtt] ca_file", "[storage] backend",
            "[ingest] max_segment_mb", "[collector] workers", "[alerts] webhook_url"} <= set(uncommented)
    config.write_text(text)
    cfg = load_config(config)
    assert cfg.storage.backend == "s3" and cfg.retention.unlinked_retention_days is not None
    RetentionPolicy(cfg.retention.margin_days, cfg.retention.unlinked_retention_days).check()

    # The real command, on the filesystem store (the S3 alternative needs a bucket): enforce --dry-run accepts
    # the suggested retention values.
    config.write_text(text.replace('backend = "s3"', 'backend = "filesystem"').replace(
        "\nendpoint = ", "\n# endpoint = ").replace("\nbucket = ", "\n# bucket = ").replace(
        "\ncredentials_file = ", "\n# credentials_file = "))
    assert run(capsys, collector_main, "--config", str(config), "db", "upgrade")[0] == 0
    (tmp_path / "data" / "storage").mkdir()
    code, out, err = run(capsys, retention_main, "--config", str(config), "enforce", "--dry-run")
    assert (code, err) == (0, ""), out + err
