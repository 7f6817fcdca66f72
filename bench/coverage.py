"""Coverage queries at a year's scale: 20 cameras × 60 s segments × 365 days = 10.5 M segment rows.

The rows are written straight into the database (raw `executemany` on SQLite, COPY on PostgreSQL; the ORM
would take hours), with one batch per room and day (a theory and a practical part of 2 h each, 09:00 and
13:30 Asia/Shanghai) and a few outages (gap records plus missing seqs) so the reports have work to do.
It prints:

- per-batch coverage (`collector.batches.batch_report`, as `exam-collector batches show` runs it): p50/p95
  over sampled batches (target p95 ≤ 50 ms);
- the full-period audit (`collector.batches.audit_period`: every camera over the whole period, gaps with
  causes) divided by one ordered scan of the segment table reading the same columns (target ≤ 2);
- the audit of every batch in the period, also as a ratio to that scan.

Scans, audit and every-batch audit run `--rounds` times interleaved (default 2); each keeps its least time and
prints every round's, with the spread. On PostgreSQL the rows go into a schema created for the run and dropped
afterwards (bench.pg_schema), never into `public`. Run from the repo root (smaller with --days):

    .venv/bin/python -m bench.coverage --database-url sqlite:////tmp/bench-cov.db --days 365
    .venv/bin/python -m bench.coverage --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test --days 365
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import Engine, select, text

from bench.pg_schema import is_postgres, private_database
from collector.batches import SHANGHAI, audit_period, batch_report
from collector.db import describe_url, make_engine, session_factory, upgrade
from collector.models import SegmentRecord

T0 = datetime(2025, 11, 27, 16, 0, tzinfo=timezone.utc)   # 2025-11-28 00:00 Shanghai
VENUE = "JL2201001-01"
INSTITUTION = "JL2201001"
AGENT = "bench-agent"
ROOMS = [("T101", "theory"), ("T102", "theory"), ("T103", "theory"), ("T104", "theory"), ("T105", "theory"),
         ("P201", "practical"), ("P202", "practical"), ("P203", "practical"), ("P204", "practical"),
         ("P205", "practical")]
COLUMNS = ("agent_id", "institution", "venue", "room", "room_kind", "camera", "seq", "file_id", "kind", "start_at",
           "end_at", "duration", "size", "sha256", "record_hash", "prev_hash", "manifest", "signature",
           "storage_path", "chain_status", "stored_at")


class BenchError(RuntimeError):
    """The benchmark could not run; the message says why."""


@dataclass(frozen=True)
class Result:
    rows: int
    load_seconds: float
    batch_p50_ms: float
    batch_p95_ms: float
    raw_scan_seconds: float
    scan_seconds: float
    audit_seconds: float
    batches_audit_seconds: float
    parts: int


def cameras() -> list[tuple[str, str, str]]:
    """(camera, room, room kind): two cameras in each of 10 rooms."""
    return [(f"{room.lower()}-{side}", room, kind) for room, kind in ROOMS for side in ("front", "back")]


def _manifest(camera: str, room: str, kind_room: str, seq: int, kind: str, start: str, end: str, cause: str | None,
              digest: str, prev: str | None) -> str:
    # Canonical form (sorted keys, no spaces), as ingest stores it.
    video = '{"codec":"h264","container":"mpegts","fps":25.0,"height":1080,"width":1920}' if kind == "segment" else "null"
    return (f'{{"agent":"{AGENT}","camera":"{camera}","cause":{"null" if cause is None else chr(34) + cause + chr(34)},'
            f'"clock":{{"offset_ms":3.0,"synced":true}},"detail":null,"duration":60.0,"end":"{end}",'
            f'"health":[],"institution":"{INSTITUTION}","kind":"{kind}",'
            f'"prev":{"null" if prev is None else chr(34) + prev + chr(34)},"room":"{room}","room_kind":"{kind_room}",'
            f'"seq":{seq},"sha256":{chr(34) + digest + chr(34) if kind == "segment" else "null"},"size":{45000000 if kind == "segment" else 0},'
            f'"start":"{start}","v":1,"video":{video}}}')


def generate(days: int, seed: int = 7):
    """Rows per camera in seq order; an outage about every 3 days per camera (a gap record, sometimes a
    missing seq instead)."""
    rng = random.Random(seed)
    per_camera = days * 24 * 60
    fake_hash = hashlib.sha256(b"bench").hexdigest()
    signature = "A" * 86 + "=="
    for camera, room, kind_room in cameras():
        prev: str | None = None
        for i in range(per_camera):
            seq = i + 1
            start = T0 + timedelta(minutes=i)
            end = start + timedelta(minutes=1)
            roll = rng.random()
            if roll < 1 / (3 * 1440):
                prev = fake_hash
                continue  # a missing seq
            kind, cause = ("gap", "camera_unreachable") if roll < 2 / (3 * 1440) else ("segment", None)
            s_txt, e_txt = _fmt(start), _fmt(end)
            manifest = _manifest(camera, room, kind_room, seq, kind, s_txt, e_txt, cause, fake_hash, prev)
            yield (AGENT, INSTITUTION, VENUE, room, kind_room, camera, seq, f"{camera}-{seq}", kind, start, end,
                   60.0, 45000000 if kind == "segment" else 0, fake_hash if kind == "segment" else None, fake_hash,
                   prev, manifest, signature,
                   f"{INSTITUTION}/{VENUE}/{camera}/{start:%Y/%m/%d}/{camera}@{s_txt}.ts" if kind == "segment" else None,
                   "linked" if seq > 1 else "first", end + timedelta(seconds=2))
            prev = fake_hash


def _fmt(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def load(engine: Engine, days: int) -> int:
    """Write agent, segments and batches with the raw driver; returns the number of segment rows."""
    rows = 0
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        now = datetime.now(timezone.utc)
        if engine.dialect.name == "sqlite":
            def ts(t: datetime) -> str:
                return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
            cur.execute("insert into agent (id, venue, institution, public_key, enrolled_at) values (?, ?, ?, ?, ?)",
                        (AGENT, VENUE, INSTITUTION, "A" * 44, ts(now)))
            sql = (f"insert into segment_record ({', '.join(COLUMNS)}) values ({', '.join('?' * len(COLUMNS))})")
            # A large page cache and a commit per million rows keep index pages from being spilled to the WAL
            # again and again (with the default 2 MB cache the WAL grew past 16 GB).
            cur.execute("pragma cache_size = -2000000")
            buffer = []
            for row in generate(days):
                buffer.append(row[:9] + (ts(row[9]), ts(row[10])) + row[11:20] + (ts(row[20]),))
                if len(buffer) >= 50_000:
                    cur.executemany(sql, buffer)
                    rows += len(buffer)
                    buffer.clear()
                    if rows % 1_000_000 == 0:
                        raw.commit()
                        print(f"  {rows} rows", flush=True)
            cur.executemany(sql, buffer)
            rows += len(buffer)
            for batch_row, part_rows in batches(days):
                cur.execute("insert into exam_batch (id, institution, occupation, level, created_at, updated_at) "
                            "values (?, ?, ?, ?, ?, ?)", batch_row[:4] + (ts(now), ts(now)))
                cur.executemany("insert into exam_batch_part (batch_id, part, venue, room, start_at, end_at) "
                                "values (?, ?, ?, ?, ?, ?)", [p[:4] + (ts(p[4]), ts(p[5])) for p in part_rows])
        else:
            cur.execute("insert into agent (id, venue, institution, public_key, enrolled_at) values (%s, %s, %s, %s, %s)",
                        (AGENT, VENUE, INSTITUTION, "A" * 44, now))
            with cur.copy(f"copy segment_record ({', '.join(COLUMNS)}) from stdin") as copy:
                for row in generate(days):
                    copy.write_row(row)
                    rows += 1
                    if rows % 1_000_000 == 0:
                        print(f"  {rows} rows", flush=True)
            for batch_row, part_rows in batches(days):
                cur.execute("insert into exam_batch (id, institution, occupation, level, created_at, updated_at) "
                            "values (%s, %s, %s, %s, %s, %s)", batch_row[:4] + (now, now))
                cur.executemany("insert into exam_batch_part (batch_id, part, venue, room, start_at, end_at) "
                                "values (%s, %s, %s, %s, %s, %s)", part_rows)
        raw.commit()
    finally:
        raw.close()
    with engine.begin() as conn:
        conn.execute(text("analyze"))
    return rows


def batches(days: int):
    """One batch per theory/practical room pair and day: theory 09:00–11:00, practical 13:30–15:30 local."""
    for day in range(days):
        date = (T0 + timedelta(days=day)).astimezone(SHANGHAI).date()
        for index in range(5):
            theory, practical = ROOMS[index][0], ROOMS[5 + index][0]
            batch_id = f"B{date:%Y%m%d}-{index + 1}"
            t_start = datetime(date.year, date.month, date.day, 9, 0, tzinfo=SHANGHAI).astimezone(timezone.utc)
            p_start = datetime(date.year, date.month, date.day, 13, 30, tzinfo=SHANGHAI).astimezone(timezone.utc)
            yield ((batch_id, INSTITUTION, "电工", "四级"),
                   [(batch_id, "theory", VENUE, theory, t_start, t_start + timedelta(hours=2)),
                    (batch_id, "practical", VENUE, practical, p_start, p_start + timedelta(hours=2))])


def ordered_scan(engine: Engine, typed: bool) -> float:
    """One pass over the segment table in (venue, camera, start) order, reading the columns the audit reads:
    untyped (driver values as they come) or typed (through the model's column types, UTC-aware datetimes)."""
    started = time.perf_counter()
    query = (select(SegmentRecord.id, SegmentRecord.seq, SegmentRecord.kind, SegmentRecord.room,
                    SegmentRecord.start_at, SegmentRecord.end_at, SegmentRecord.manifest)
             .order_by(SegmentRecord.venue, SegmentRecord.camera, SegmentRecord.start_at)) if typed else text(
        "select id, seq, kind, room, start_at, end_at, manifest from segment_record order by venue, camera, start_at")
    with engine.connect() as conn:
        for _ in conn.execution_options(stream_results=True, yield_per=20_000).execute(query):
            pass
    return time.perf_counter() - started


def run(database_url: str, days: int, samples: int = 200, reuse: bool = False, rounds: int = 2) -> Result:
    """On PostgreSQL the rows go into a schema created for this run and dropped afterwards (bench.pg_schema)."""
    if reuse and is_postgres(database_url):
        raise BenchError("--reuse needs a SQLite file: on PostgreSQL every run loads into a private schema that is "
                         "dropped afterwards, so no rows are left to reuse (or to disturb the tests)")
    with private_database(database_url) as url:
        assert url is not None
        return _run(url, days, samples, reuse, max(1, rounds))


def _run(database_url: str, days: int, samples: int, reuse: bool, rounds: int) -> Result:
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        with engine.connect() as conn:
            existing = conn.execute(text("select count(*) from segment_record")).scalar_one()
        if existing and not reuse:
            raise BenchError(f"{describe_url(database_url)} already has {existing} segment rows: use an empty "
                             "database, or --reuse to measure the rows already there")
        started = time.perf_counter()
        rows = existing if existing else load(engine, days)
        load_seconds = time.perf_counter() - started
        print(f"{rows} segment rows ready in {load_seconds:.0f} s on {describe_url(database_url)}", flush=True)
        sessions = session_factory(engine)
        with sessions() as s:
            ids = [r[0] for r in s.execute(text("select id from exam_batch order by id"))]
            parts = s.execute(text("select count(*) from exam_batch_part")).scalar_one()
        rng = random.Random(1)
        timings = []
        for batch_id in rng.sample(ids, min(samples, len(ids))):
            t = time.perf_counter()
            with sessions() as s:
                report = batch_report(s, batch_id)
            timings.append((time.perf_counter() - t) * 1000)
            assert report.parts, batch_id
        timings.sort()
        p95 = timings[max(0, int(round(0.95 * len(timings))) - 1)]
        print(f"per-batch coverage over {len(timings)} batches: p50 {statistics.median(timings):.1f} ms, "
              f"p95 {p95:.1f} ms (target <= 50)", flush=True)
        # Interleaved rounds, the least time of each (the baselines, the scans, as well as the audits).
        raw_scans, scans, audits, everys = [], [], [], []
        end = T0 + timedelta(days=days)
        for _ in range(rounds):
            raw_scans.append(ordered_scan(engine, typed=False))
            scans.append(ordered_scan(engine, typed=True))
            t = time.perf_counter()
            with sessions() as s:
                cams = audit_period(s, T0, end)
            audits.append(time.perf_counter() - t)
            t = time.perf_counter()
            with sessions() as s:
                for batch_id in ids:
                    batch_report(s, batch_id)
            everys.append(time.perf_counter() - t)
        raw_scan, scan, audit, every = min(raw_scans), min(scans), min(audits), min(everys)
        print(f"ordered scan of segment_record (baseline), least of {rounds}: {raw_scan:.2f} s untyped "
              f"(rounds {_spread(raw_scans)}), {scan:.2f} s typed (rounds {_spread(scans)})", flush=True)
        gaps = sum(len(c.gaps) for c in cams)
        print(f"full-period audit ({len(cams)} cameras, {gaps} gaps), least of {rounds}: {audit:.2f} s (rounds "
              f"{_spread(audits)}) = {audit / raw_scan:.2f} × untyped scan (target <= 2), {audit / scan:.2f} × "
              "typed scan", flush=True)
        print(f"every batch ({len(ids)} batches, {parts} parts), least of {rounds}: {every:.2f} s (rounds "
              f"{_spread(everys)}) = {every / scan:.2f} × typed scan", flush=True)
        return Result(rows, load_seconds, statistics.median(timings), p95, raw_scan, scan, audit, every, parts)
    finally:
        engine.dispose()


def _spread(seconds: list[float]) -> str:
    """Every round's time and the spread between the slowest and the fastest."""
    return (", ".join(f"{v:.2f}" for v in seconds)
            + (f"; spread {100 * (max(seconds) / min(seconds) - 1):.0f} %" if len(seconds) > 1 and min(seconds) else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="An empty database (SQLite file or PostgreSQL).")
    parser.add_argument("--days", type=int, default=365, help="Days of footage (365 = 10.5 M rows).")
    parser.add_argument("--samples", type=int, default=200, help="Batches timed for the per-batch p95.")
    parser.add_argument("--reuse", action="store_true", help="Measure rows already in the database (SQLite only: "
                        "on PostgreSQL each run uses a private schema, dropped afterwards).")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds of scans and audits, interleaved; the least "
                        "time of each is used (default 2).")
    args = parser.parse_args(argv)
    try:
        run(args.database_url, args.days, args.samples, args.reuse, args.rounds)
    except BenchError as exc:
        print(f"bench.coverage: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
