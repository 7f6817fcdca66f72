"""docs/config.md documents exactly the tables and keys the config loaders accept.

What the code accepts is asked of the loaders themselves at test time: each table, given a key no loader
knows, is refused with the list of the keys it knows ("... is not a known key: remove it (known: a, b)"), and
the top level likewise lists its tables. So a key added to or removed from edge_agent/config.py,
collector/config.py or exam_contract/mqtt.py without docs/config.md fails here, whoever adds it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from collector.config import config_from_dict
from edge_agent.config import parse_config
from exam_contract.tomlconfig import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "config.md"
NO_SUCH_KEY = "zz_not_a_config_key_qq"
PROGRAMS = {"edge.toml": "edge", "collector.toml": "collector"}


def _known_from(error: ConfigError) -> set[str]:
    match = re.search(r"\(known: ([^)]*)\)", str(error))
    assert match, f"the refusal no longer lists the known keys: {error}"
    return {name.strip().strip("[]") for name in match.group(1).split(",")}


def _refusal(load, raw: dict) -> ConfigError:  # noqa: ANN001
    with pytest.raises(ConfigError) as info:
        load(raw)
    return info.value


def edge_accepts(tmp_path: Path) -> dict[str, set[str]]:
    base = {"agent": {"id": "a1", "institution": "I1", "venue": "V1", "data_dir": str(tmp_path / "data"),
                      "key_file": str(tmp_path / "agent.key")},
            "mqtt": {"url": "mqtt://127.0.0.1:1883"}}

    def load(raw: dict) -> None:
        parse_config(raw, base_dir=tmp_path, path=tmp_path / "edge.toml")

    parse_config(base, base_dir=tmp_path, path=tmp_path / "edge.toml")  # the base itself is valid
    sections = _known_from(_refusal(load, {**base, NO_SUCH_KEY: {}}))
    accepted: dict[str, set[str]] = {}
    for section in sections:
        if section == "camera":
            raw = {**base, "camera": [{NO_SUCH_KEY: 1}]}
        else:
            raw = {**base, section: {**base.get(section, {}), NO_SUCH_KEY: 1}}
        accepted[section] = _known_from(_refusal(load, raw))
    return accepted


def collector_accepts(tmp_path: Path) -> dict[str, set[str]]:
    base = {"collector": {"data_dir": str(tmp_path / "data")}, "mqtt": {"url": "mqtt://127.0.0.1:1883"}}

    def load(raw: dict) -> None:
        config_from_dict(raw, base=tmp_path)

    config_from_dict(base, base=tmp_path)
    sections = _known_from(_refusal(load, {**base, NO_SUCH_KEY: {}}))
    return {section: _known_from(_refusal(load, {**base, section: {**base.get(section, {}), NO_SUCH_KEY: 1}}))
            for section in sections}


def documented() -> dict[str, dict[str, set[str]]]:
    """{program: {table: keys}} from docs/config.md: `## ... edge.toml` / `## ... collector.toml` headings, a
    `### [table]` heading per table, and the backticked first column of its table."""
    found: dict[str, dict[str, set[str]]] = {}
    program = section = None
    fenced = False
    for line in CONFIG_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        if line.startswith("## "):
            program = next((name for file, name in PROGRAMS.items() if f"`{file}`" in line), None)
            section = None
        elif line.startswith("### ") and program is not None:
            match = re.fullmatch(r"### `\[{1,2}([a-z_]+)\]{1,2}`", line.strip())
            assert match, f"docs/config.md: a table heading is written ### `[name]`: {line}"
            section = match.group(1)
            found.setdefault(program, {})[section] = set()
        elif line.startswith("|") and program is not None and section is not None:
            first = line.strip("|").split("|")[0].strip()
            key = re.fullmatch(r"`([a-z_]+)`", first)
            if key:
                found[program][section].add(key.group(1))
    return found


@pytest.fixture(scope="module")
def accepted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, set[str]]]:
    tmp = tmp_path_factory.mktemp("config-docs")
    return {"edge": edge_accepts(tmp), "collector": collector_accepts(tmp)}


def test_the_loaders_were_asked_something(accepted):
    """Guards the derivation: known keys of both files come out (an empty answer would pass everything)."""
    assert {"agent", "mqtt", "recording", "health", "camera"} <= set(accepted["edge"])
    assert {"collector", "mqtt", "http", "storage", "ingest", "retention"} <= set(accepted["collector"])
    assert {"id", "min_free_mb"} <= accepted["edge"]["agent"]
    assert "client_id" in accepted["collector"]["mqtt"] and "client_id" not in accepted["edge"]["mqtt"]
    assert {"cert_file", "login_window_seconds"} <= accepted["collector"]["http"]


@pytest.mark.parametrize("program", sorted(PROGRAMS.values()))
def test_config_md_documents_exactly_the_tables_the_code_accepts(program, accepted):
    assert set(documented().get(program, {})) == set(accepted[program])


@pytest.mark.parametrize("program", sorted(PROGRAMS.values()))
def test_config_md_documents_exactly_the_keys_the_code_accepts(program, accepted):
    docs = documented().get(program, {})
    problems = []
    for section, keys in sorted(accepted[program].items()):
        shown = docs.get(section, set())
        if keys - shown:
            problems.append(f"[{section}] accepted but not documented: {sorted(keys - shown)}")
        if shown - keys:
            problems.append(f"[{section}] documented but not accepted: {sorted(shown - keys)}")
    assert problems == []


def test_the_doc_parser_reads_the_tables():
    """docs/config.md parses into tables with keys (a changed layout must not make the comparison vacuous)."""
    docs = documented()
    assert set(docs) == {"edge", "collector"}
    assert all(keys for tables in docs.values() for keys in tables.values())
