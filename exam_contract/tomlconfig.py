"""Reading the TOML configs of both commands: every error names the key and says how to fix it."""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MQTT_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class ConfigError(Exception):
    """The config is unusable; the message names the TOML key and the fix."""


def load_file(path: Path, missing_fix: str) -> dict[str, Any]:
    """The TOML document in `path`; `missing_fix` tells how to create the file when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist: {missing_fix}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc}): fix the path or its "
                          "permissions") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc}): save it as UTF-8") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}): fix the syntax") from exc


def table(raw: dict[str, Any], name: str, *, required: bool, init_command: str) -> dict[str, Any]:
    value = raw.get(name)
    if value is None:
        if required:
            raise ConfigError(f"[{name}] table is missing: add a [{name}] section (see `{init_command}`)")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table, not {type(value).__name__}: write it as a [{name}] section")
    return value


def string(section_table: dict[str, Any], section: str, key: str, *, required: bool) -> str | None:
    value = section_table.get(key)
    if value is None:
        if required:
            raise ConfigError(f"[{section}] {key} is missing: set {key} = \"...\" in the [{section}] table")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"[{section}] {key} = {value!r} must be a non-empty string: quote it")
    return value.strip()


def path(section_table: dict[str, Any], section: str, key: str, base: Path, *, required: bool) -> Path | None:
    """A path; a relative one is taken relative to `base` (the config file's folder)."""
    value = string(section_table, section, key, required=required)
    if value is None:
        return None
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


def integer(section_table: dict[str, Any], section: str, key: str, default: int, low: int, high: int) -> int:
    value = section_table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"[{section}] {key} = {value!r} must be an integer: set a whole number between {low} "
                          f"and {high}")
    if not low <= value <= high:
        raise ConfigError(f"[{section}] {key} = {value} is out of range {low}..{high}: set a value between {low} "
                          f"and {high}")
    return value


def number(section_table: dict[str, Any], section: str, key: str, default: float, low: float, high: float) -> float:
    value = section_table.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"[{section}] {key} = {value!r} must be a number: set a value between {low} and {high}")
    if not low <= value <= high:
        raise ConfigError(f"[{section}] {key} = {value} is out of range {low}..{high}: set a value between {low} "
                          f"and {high}")
    return float(value)


def boolean(section_table: dict[str, Any], section: str, key: str, default: bool) -> bool:
    value = section_table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"[{section}] {key} = {value!r} must be true or false: write it without quotes")
    return value


def nearest_key(key: str, known: set[str] | frozenset[str]) -> str | None:
    """The known key a misspelt `key` most likely means (difflib's closest match), or None."""
    found = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_keys(section_table: dict[str, Any], section: str, known: set[str] | frozenset[str]) -> None:
    """Refuse the first key of a table that is not in `known`, naming the nearest known one when there is one
    (a misspelt key must never silently leave its default in force)."""
    for key in section_table:
        if key not in known:
            nearest = nearest_key(key, known)
            if nearest is not None:
                raise ConfigError(f"[{section}] {key} is not a known key; did you mean {nearest}?")
            raise ConfigError(f"[{section}] {key} is not a known key: remove it (known: {', '.join(sorted(known))})")


def unknown_sections(raw: dict[str, Any], known: set[str] | frozenset[str]) -> None:
    """Refuse the first top-level entry of a config that is not one of its `known` tables, naming the nearest."""
    for key, value in raw.items():
        if key in known:
            continue
        names = ", ".join(f"[{name}]" for name in sorted(known))
        if not isinstance(value, (dict, list)):
            raise ConfigError(f"{key} is not a known key at the top level: move it under its section ({names}) "
                              "or remove it")
        nearest = nearest_key(key, known)
        if nearest is not None:
            raise ConfigError(f"[{key}] is not a known section; did you mean [{nearest}]?")
        raise ConfigError(f"[{key}] is not a known section: remove it (known: {names})")


def mqtt_url(url: str, key: str = "[mqtt] url") -> tuple[str, int, bool]:
    """(host, port, tls) of `mqtt://host[:port]` or `mqtts://host[:port]`; `key` names where the URL came from."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{key} = {url!r} is not a valid URL ({exc}): "
                          "use mqtt://host:1883 or mqtts://host:8883") from exc
    if parts.scheme not in MQTT_DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(f"{key} = {url!r} is not an MQTT URL: use mqtt://host:1883 or mqtts://host:8883")
    return parts.hostname, port or MQTT_DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts"
