"""Reading a batch file from the exam-affairs system: decoding (UTF-8, UTF-16, GB18030), CSV or JSON rows, and
validated part rows; every problem is a `RowError` with its row and field. No database."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

SHANGHAI = ZoneInfo("Asia/Shanghai")
COLUMNS: tuple[str, ...] = ("batch_id", "institution", "venue", "occupation", "level", "part", "room", "start", "end")
PARTS: tuple[str, ...] = ("theory", "practical")
MAX_PART_HOURS = 24
RESAVE_ADVICE = ("re-save it as UTF-8: in Excel choose 文件 → 另存为 → \"CSV UTF-8 (逗号分隔)(*.csv)\"; "
                 "in WPS choose 另存为 → CSV and encoding UTF-8")


@dataclass(frozen=True)
class RowError:
    row: int          # CSV: line number as a spreadsheet shows it (header = 1); JSON: 1-based item index
    field: str
    problem: str

    def __str__(self) -> str:
        return f"row {self.row}, {self.field}: {self.problem}"


class BatchImportError(ValueError):
    """The file was not imported (nothing was); `errors` lists each problem with its row and field."""

    def __init__(self, errors: Sequence[RowError], source: str = "") -> None:
        self.errors = list(errors)
        self.source = source
        shown = "; ".join(str(e) for e in self.errors[:5])
        more = f" (and {len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        super().__init__(f"{source + ': ' if source else ''}{len(self.errors)} problem(s), nothing imported: "
                         f"{shown}{more}")


@dataclass(frozen=True)
class PartRow:
    row: int
    batch_id: str
    institution: str
    venue: str
    occupation: str
    level: str
    part: str
    room: str
    start: datetime   # UTC
    end: datetime     # UTC


# ---------------------------------------------------------------------------- reading files

def decode_text(data: bytes) -> tuple[str, str]:
    """(text, encoding name). UTF-8 with or without BOM, UTF-16 with BOM (Excel "Unicode text"), else
    GB18030 (which includes GBK), the default of Excel and WPS on Chinese Windows."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="strict"), "utf-8-sig"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16"), "utf-16"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("gb18030"), "gb18030"
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise BatchImportError([RowError(line, "file", f"is neither UTF-8 nor GB18030/GBK text (bad byte at "
                                                       f"offset {exc.start}): {RESAVE_ADVICE}")]) from exc


def _csv_rows(text: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    lines = text.splitlines()
    header_line = next((line for line in lines if line.strip()), "")
    delimiter = max((",", "\t", ";"), key=header_line.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        if header is None:
            header = [v.strip().lower() for v in values]
            continue
        rows.append((reader.line_num, values))
    return header or [], rows


def parse_rows(data: bytes, fmt: str | None = None) -> tuple[list[tuple[int, dict[str, str]]], str]:
    """([(row number, {column: value})], encoding). Raises BatchImportError for structural problems."""
    text, encoding = decode_text(data)
    body = text.lstrip("\ufeff").lstrip()
    if fmt is None:
        fmt = "json" if body[:1] in ("[", "{") else "csv"
    errors: list[RowError] = []
    out: list[tuple[int, dict[str, str]]] = []
    if fmt == "json":
        try:
            raw = json.loads(body)
        except ValueError as exc:
            raise BatchImportError([RowError(1, "file", f"is not valid JSON ({exc}): give a list of objects "
                                                        f"with keys {', '.join(COLUMNS)}")]) from exc
        if isinstance(raw, dict):
            raw = raw.get("rows", raw.get("parts"))
        if not isinstance(raw, list):
            raise BatchImportError([RowError(1, "file", "JSON must be a list of objects (or {\"rows\": [...]}), "
                                                        f"each with keys {', '.join(COLUMNS)}")])
        for index, item in enumerate(raw, start=1):
            if not isinstance(item, dict):
                errors.append(RowError(index, "row", "is not a JSON object"))
                continue
            missing = [c for c in COLUMNS if c not in item]
            for column in missing:
                errors.append(RowError(index, column, "missing key"))
            values = {}
            for k, v in item.items():
                if v is not None and not isinstance(v, (str, int, float)):
                    errors.append(RowError(index, str(k), f"must be a string, not {type(v).__name__}"))
                values[str(k).strip().lower()] = "" if v is None else str(v)
            out.append((index, values))
    else:
        header, rows = _csv_rows(body)
        missing = [c for c in COLUMNS if c not in header]
        if not header:
            raise BatchImportError([RowError(1, "file", f"is empty: give a header row {','.join(COLUMNS)} "
                                                        "and one row per batch part")])
        if missing:
            raise BatchImportError([RowError(1, c, f"missing column (the header must name {','.join(COLUMNS)})")
                                    for c in missing])
        for line, fields in rows:
            if len(fields) != len(header):
                errors.append(RowError(line, "row", f"has {len(fields)} fields, the header has {len(header)}"))
                continue
            out.append((line, dict(zip(header, fields, strict=True))))
    if errors:
        raise BatchImportError(errors)
    if not out:
        raise BatchImportError([RowError(1, "file", "has no data rows: add one row per batch part")])
    return out, encoding


_SLASH_TIME = re.compile(r"^(\d{4})/(\d{1,2})/(\d{1,2})[ T](\d{1,2}):(\d{2})(?::(\d{2}))?$")
_HAS_CLOCK = re.compile(r"\d[T ]\d{1,2}:\d{2}")


def parse_exam_time(value: str) -> datetime:
    """ISO 8601 with a time of day, to UTC; a naive time is Asia/Shanghai (docs/design/time.md). Also the
    `2026/11/26 9:00` form Excel writes when a CSV of ISO times is opened and saved again."""
    text = value.strip()
    slash = _SLASH_TIME.match(text)
    if slash:
        y, mo, d, h, mi, s = slash.groups()
        text = f"{int(y):04d}-{int(mo):02d}-{int(d):02d}T{int(h):02d}:{mi}:{s or '00'}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time: write e.g. 2026-11-26T09:00:00+08:00 "
                         "(without an offset it is taken as Asia/Shanghai)") from None
    if not _HAS_CLOCK.search(text):
        raise ValueError(f"{value!r} has no time of day: write e.g. 2026-11-26T09:00:00+08:00")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=SHANGHAI)
    return moment.astimezone(timezone.utc)


def validate_rows(rows: Sequence[tuple[int, dict[str, str]]]) -> list[PartRow]:
    errors: list[RowError] = []
    parts: list[PartRow] = []
    first_of_batch: dict[str, PartRow] = {}
    seen: dict[tuple[str, str, str], int] = {}
    for line, values in rows:
        row_errors: list[RowError] = []
        clean = {c: (values.get(c) or "").strip() for c in COLUMNS}
        for column in ("batch_id", "institution", "venue", "occupation", "level", "room"):
            if not clean[column]:
                row_errors.append(RowError(line, column, "is empty"))
        part = clean["part"].lower()
        if part not in PARTS:
            row_errors.append(RowError(line, "part", f"{clean['part']!r} is not theory (理论知识) or "
                                                     "practical (操作技能)"))
        times: dict[str, datetime] = {}
        for column in ("start", "end"):
            try:
                times[column] = parse_exam_time(clean[column])
            except ValueError as exc:
                row_errors.append(RowError(line, column, str(exc)))
        if len(times) == 2:
            if times["end"] <= times["start"]:
                row_errors.append(RowError(line, "end", f"{clean['end']} is not after start {clean['start']}"))
            elif times["end"] - times["start"] > timedelta(hours=MAX_PART_HOURS):
                row_errors.append(RowError(line, "end", f"the part lasts more than {MAX_PART_HOURS} h: check "
                                                        "the date of start and end"))
        if row_errors:
            errors.extend(row_errors)
            continue
        row = PartRow(line, clean["batch_id"], clean["institution"], clean["venue"], clean["occupation"],
                      clean["level"], part, clean["room"], times["start"], times["end"])
        key = (row.batch_id, row.part, row.room)
        if key in seen:
            errors.append(RowError(line, "room", f"batch {row.batch_id} {row.part} in room {row.room} is "
                                                 f"already given in row {seen[key]}"))
            continue
        seen[key] = line
        first = first_of_batch.setdefault(row.batch_id, row)
        for column in ("institution", "occupation", "level"):
            if getattr(row, column) != getattr(first, column):
                errors.append(RowError(line, column, f"{getattr(row, column)!r} differs from "
                                                     f"{getattr(first, column)!r} in row {first.row} of the "
                                                     f"same batch {row.batch_id}"))
        parts.append(row)
    if errors:
        raise BatchImportError(errors)
    return parts
