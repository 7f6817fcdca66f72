"""The journal: journal.sqlite, the durable record of every sealed record, its upload state and each camera's
chain head (schema, added-columns migration, the `Journal` API and the rows it returns)."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exam_contract.canonical import format_time, parse_time, sha256_hex
from exam_contract.manifest import Manifest
from exam_contract.schedule import ScheduleWindow
from exam_contract.signing import sign, verify

from .upload_order import Candidate, window_index

UTC = timezone.utc
CANDIDATE_PAGE = 256

SCHEMA = """
create table if not exists cameras (
    camera text primary key,
    last_seq integer not null,
    last_hash text,
    last_end text
);
create table if not exists records (
    id integer primary key autoincrement,
    camera text not null,
    seq integer not null,
    kind text not null,
    file_id text not null,
    manifest text not null,
    signature text not null,
    record_hash text not null,
    size integer not null,
    path text,
    src_path text,
    moved integer not null default 0,
    state text not null default 'pending',
    reason text,
    created_at text not null,
    acked_at text,
    unique (camera, seq)
);
create index if not exists records_state on records (state, id);
create index if not exists records_src on records (src_path);
-- batch-first upload: a batch window's pending footage by room and start time, without reading every manifest
create index if not exists records_pending_room_start on records
    (json_extract(manifest, '$.room'), json_extract(manifest, '$.start')) where state = 'pending';
create table if not exists pruned (
    record_id integer primary key,
    at text not null,
    reason text not null
);
create table if not exists runs (
    camera text not null,
    run_id text not null,
    anchor text not null,
    primary key (camera, run_id)
);
create table if not exists adoptions (
    camera text primary key,
    seq integer not null,
    record_hash text not null,
    end_time text not null,
    at text not null
);
"""
# Columns added after the first release of the journal: (table, column, declaration), added when missing.
_ADDED_COLUMNS = (
    ("records", "retry_at", "text"),                         # a retryable rejection is sent again after this
    ("records", "attempts", "integer not null default 0"),   # rejections so far (for the backoff)
)
RETRY_BASE_SECONDS = 60.0
RETRY_CAP_SECONDS = 3600.0


def retry_delay(attempts: int) -> timedelta:
    """Backoff after the `attempts`-th rejection: 1, 2, 4 ... minutes, at most an hour."""
    return timedelta(seconds=min(RETRY_BASE_SECONDS * 2 ** max(0, attempts - 1), RETRY_CAP_SECONDS))


class JournalError(Exception):
    """The journal is inconsistent or unusable; the message names the file."""


@dataclass(frozen=True)
class CameraState:
    last_seq: int = 0
    last_hash: str | None = None
    last_end: datetime | None = None


@dataclass(frozen=True)
class Record:
    id: int
    camera: str
    seq: int
    kind: str
    file_id: str
    manifest_json: str
    signature: str
    record_hash: str
    size: int
    path: Path | None
    state: str
    reason: str | None

    @property
    def manifest_raw(self) -> dict[str, Any]:
        return json.loads(self.manifest_json)


@dataclass(frozen=True)
class CameraStatus:
    camera: str
    last_seq: int
    last_stored_seq: int | None
    pending: int
    pending_bytes: int
    rejected: int


def _now() -> datetime:
    return datetime.now(UTC)


def _utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


class Journal:
    """Thread-safe access to journal.sqlite (one connection, one lock)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("pragma journal_mode=wal")
            self._db.execute("pragma synchronous=full")
            self._db.executescript(SCHEMA)
            for table, column, declaration in _ADDED_COLUMNS:
                have = {row[1] for row in self._db.execute(f"pragma table_info({table})")}
                if column not in have:
                    self._db.execute(f"alter table {table} add column {column} {declaration}")
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path} cannot be opened ({exc}): check the data_dir disk and "
                               "permissions") from exc
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- cameras and records -------------------------------------------------------------------
    def camera_state(self, camera: str) -> CameraState:
        with self._lock:
            row = self._db.execute("select last_seq, last_hash, last_end from cameras where camera = ?",
                                   (camera,)).fetchone()
        if row is None:
            return CameraState()
        return CameraState(row[0], row[1], parse_time(row[2]) if row[2] else None)

    def cameras(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("select camera from cameras order by camera")]

    def append(self, manifest: Manifest, signature: str, path: Path | None, src_path: Path | None) -> Record:
        """Insert the next record of a camera in one durable transaction; refuses a seq or prev that does
        not continue the camera's chain (so no seq is reused or skipped)."""
        canonical = manifest.canonical()
        record_hash = sha256_hex(canonical)
        with self._lock:
            self._db.execute("begin immediate")
            try:
                row = self._db.execute("select last_seq, last_hash from cameras where camera = ?",
                                       (manifest.camera,)).fetchone()
                last_seq, last_hash = (row[0], row[1]) if row else (0, None)
                if manifest.seq != last_seq + 1 or manifest.prev != last_hash:
                    raise JournalError(f"journal {self.path}: camera {manifest.camera} record seq {manifest.seq} "
                                       f"does not follow seq {last_seq}")
                cur = self._db.execute(
                    "insert into records (camera, seq, kind, file_id, manifest, signature, record_hash, size, "
                    "path, src_path, moved, state, created_at) values (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (manifest.camera, manifest.seq, manifest.kind, manifest.file_id, canonical.decode("utf-8"),
                     signature, record_hash, manifest.size, str(path) if path else None,
                     str(src_path) if src_path else None, 0 if (path and src_path and path != src_path) else 1,
                     "pending", _utc_iso(_now())))
                self._db.execute(
                    "insert into cameras (camera, last_seq, last_hash, last_end) values (?,?,?,?) "
                    "on conflict(camera) do update set last_seq = excluded.last_seq, "
                    "last_hash = excluded.last_hash, last_end = excluded.last_end",
                    (manifest.camera, manifest.seq, record_hash, format_time(manifest.end)))
                self._db.execute("commit")
            except BaseException:
                self._db.execute("rollback")
                raise
            rowid = cur.lastrowid
        assert rowid is not None   # set by the INSERT above
        return self.record(rowid)

    def record(self, rowid: int) -> Record:
        with self._lock:
            row = self._db.execute(f"select {_RECORD_COLS} from records where id = ?", (rowid,)).fetchone()
        return _record(row)

    def records(self, camera: str | None = None) -> list[Record]:
        with self._lock:
            if camera is None:
                rows = self._db.execute(f"select {_RECORD_COLS} from records order by id").fetchall()
            else:
                rows = self._db.execute(f"select {_RECORD_COLS} from records where camera = ? order by seq",
                                        (camera,)).fetchall()
        return [_record(r) for r in rows]

    def pending(self, limit: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[Record]:
        """Oldest pending records first (insert order == seq order per camera)."""
        with self._lock:
            rows = self._db.execute(f"select {_RECORD_COLS} from records where state = 'pending' and moved = 1 "
                                    "order by id limit ?", (limit + len(exclude),)).fetchall()
        out = [_record(r) for r in rows if r[0] not in exclude]
        return out[:limit]

    def pending_candidates(self, windows: Sequence[ScheduleWindow], limit: int,
                           exclude: set[int] | frozenset[int] = frozenset(),
                           longest_record: timedelta = timedelta(hours=1)) -> list[Candidate]:
        """Pending records ready to upload (as `pending`), with the room and times of their manifests: enough for
        the batch-first order (edge_agent/upload_order.py) to choose `limit` of them exactly as it would from all
        of them: each window's pending footage in that order (through an index, oldest window first, until
        `limit` are found), and the oldest records that match no window (until `limit` are found). A backlog of a
        day is never read whole. `longest_record` bounds how long before a window a record overlapping it can
        start (a longer one, a gap record, counts with the rest)."""
        want = limit + len(exclude)
        found: dict[int, Candidate] = {}
        with self._lock:
            in_windows = 0
            for window in windows:
                if in_windows >= want:
                    break
                for room in window.rooms:
                    rows = self._db.execute(
                        "select id, json_extract(manifest, '$.room'), json_extract(manifest, '$.start'), "
                        "json_extract(manifest, '$.end') from records where state = 'pending' and moved = 1 "
                        "and json_extract(manifest, '$.room') = ? and json_extract(manifest, '$.start') >= ? "
                        "and json_extract(manifest, '$.start') < ? and json_extract(manifest, '$.end') > ? "
                        "order by json_extract(manifest, '$.start'), id limit ?",
                        (room, format_time(window.start - longest_record), format_time(window.end),
                         format_time(window.start), want)).fetchall()
                    for row in rows:
                        if row[0] not in found:
                            found[row[0]] = _candidate(row)
                            in_windows += 1
            rest, after = 0, 0
            while rest < want:
                rows = self._db.execute(
                    "select id, json_extract(manifest, '$.room'), json_extract(manifest, '$.start'), "
                    "json_extract(manifest, '$.end') from records where state = 'pending' and moved = 1 and id > ? "
                    "order by id limit ?", (after, CANDIDATE_PAGE)).fetchall()
                for row in rows:
                    candidate = found.get(row[0]) or _candidate(row)
                    found[row[0]] = candidate
                    if window_index(candidate, windows) is None:
                        rest += 1
                if len(rows) < CANDIDATE_PAGE:
                    break
                after = rows[-1][0]
        return sorted((c for c in found.values() if c.id not in exclude), key=lambda c: c.id)

    def window_backlog(self, windows: Sequence[ScheduleWindow], longest_record: timedelta) -> tuple[int, int]:
        """(records, bytes) pending whose room and time fall in one of `windows` (through the same index)."""
        sizes: dict[int, int] = {}
        with self._lock:
            for window in windows:
                for room in window.rooms:
                    for rowid, size in self._db.execute(
                            "select id, size from records where state = 'pending' "
                            "and json_extract(manifest, '$.room') = ? and json_extract(manifest, '$.start') >= ? "
                            "and json_extract(manifest, '$.start') < ? and json_extract(manifest, '$.end') > ?",
                            (room, format_time(window.start - longest_record), format_time(window.end),
                             format_time(window.start))):
                        sizes[rowid] = size
        return len(sizes), sum(sizes.values())

    def pending_count(self) -> int:
        with self._lock:
            return self._db.execute("select count(*) from records where state = 'pending'").fetchone()[0]

    def is_journaled(self, path: Path) -> bool:
        with self._lock:
            row = self._db.execute("select 1 from records where src_path = ? or path = ? limit 1",
                                   (str(path), str(path))).fetchone()
        return row is not None

    def set_moved(self, rowid: int) -> None:
        with self._lock:
            self._db.execute("update records set moved = 1 where id = ?", (rowid,))

    def unmoved(self) -> list[tuple[int, Path, Path]]:
        with self._lock:
            rows = self._db.execute("select id, src_path, path from records where moved = 0 order by id").fetchall()
        return [(r[0], Path(r[1]), Path(r[2])) for r in rows]

    def mark_stored(self, camera: str, seq: int, record_hash: str) -> bool:
        """The collector stored this record: only a pending record whose hash is `record_hash` becomes stored
        (an acknowledgement of other bytes, e.g. of a record a lost journal once had under this seq, is not
        one of this record). Only stored records may ever be pruned."""
        with self._lock:
            cur = self._db.execute("update records set state = 'stored', reason = null, retry_at = null, "
                                   "acked_at = ? where camera = ? and seq = ? and record_hash = ? "
                                   "and state = 'pending'", (_utc_iso(_now()), camera, seq, record_hash))
        return cur.rowcount > 0

    def mark_rejected(self, camera: str, seq: int, reason: str | None, record_hash: str | None,
                      retryable: bool = False) -> tuple[bool, datetime | None]:
        """The collector rejected this pending record (the one with `record_hash`, when the reply names one).
        Returns (marked, when it is sent again): a retryable rejection is retried after a backoff, the others
        wait for `exam-edge retry`. Rejected records are never pruned."""
        with self._lock:
            row = self._db.execute("select id, attempts from records where camera = ? and seq = ? "
                                   "and state = 'pending' and (? is null or record_hash = ?)",
                                   (camera, seq, record_hash, record_hash)).fetchone()
            if row is None:
                return False, None
            attempts = row[1] + 1
            retry_at = _now() + retry_delay(attempts) if retryable else None
            self._db.execute("update records set state = 'rejected', reason = ?, acked_at = ?, attempts = ?, "
                             "retry_at = ? where id = ?", (reason, _utc_iso(_now()), attempts,
                                                           _utc_iso(retry_at) if retry_at else None, row[0]))
        return True, retry_at

    def requeue_due(self, now: datetime | None = None) -> int:
        """Retryable rejections whose backoff is over go back to pending; returns how many."""
        moment = _utc_iso(now or _now())
        with self._lock:
            due = self._db.execute("select 1 from records where state = 'rejected' and retry_at is not null "
                                   "and retry_at <= ? limit 1", (moment,)).fetchone()
            if due is None:  # no write (and no fsync) when nothing is due
                return 0
            cur = self._db.execute("update records set state = 'pending', retry_at = null where state = 'rejected' "
                                   "and retry_at is not null and retry_at <= ?", (moment,))
        return cur.rowcount

    def requeue_rejected(self, camera: str | None = None) -> int:
        """`exam-edge retry`: every rejected record (of one camera) goes back to pending."""
        with self._lock:
            cur = self._db.execute("update records set state = 'pending', retry_at = null, attempts = 0 "
                                   "where state = 'rejected' and (? is null or camera = ?)", (camera, camera))
        return cur.rowcount

    def rejected_summary(self) -> tuple[int, Record | None]:
        """How many records are rejected, and the oldest of them."""
        with self._lock:
            count = self._db.execute("select count(*) from records where state = 'rejected'").fetchone()[0]
            row = self._db.execute(f"select {_RECORD_COLS} from records where state = 'rejected' order by id "
                                   "limit 1").fetchone()
        return count, (_record(row) if row else None)

    def resign(self, key: Ed25519PrivateKey) -> int:
        """Give every record not yet stored a signature by `key` when its own does not verify with it (the agent's
        key was replaced: the collector verifies with the current key). The manifest, and so the record hash and
        the chain, are unchanged: only the signature beside them is. Returns how many were re-signed."""
        public = key.public_key()
        changed = 0
        with self._lock:
            rows = self._db.execute("select id, manifest, signature from records "
                                    "where state in ('pending', 'rejected')").fetchall()
            for rowid, manifest, signature in rows:
                canonical = manifest.encode("utf-8")
                if verify(public, canonical, signature):
                    continue
                self._db.execute("update records set signature = ? where id = ?", (sign(key, canonical), rowid))
                changed += 1
        return changed

    def adopt_head(self, camera: str, seq: int, record_hash: str, end: datetime) -> bool:
        """Continue a camera's chain from the collector's newest record of it (a journal started anew on a
        replaced machine): its next record gets seq + 1 and prev = record_hash. Only for a camera this journal
        has never recorded; returns False otherwise."""
        with self._lock:
            self._db.execute("begin immediate")
            try:
                if self._db.execute("select 1 from cameras where camera = ?", (camera,)).fetchone() is not None:
                    self._db.execute("rollback")
                    return False
                self._db.execute("insert into cameras (camera, last_seq, last_hash, last_end) values (?,?,?,?)",
                                 (camera, seq, record_hash, format_time(end)))
                self._db.execute("insert or replace into adoptions (camera, seq, record_hash, end_time, at) "
                                 "values (?,?,?,?,?)", (camera, seq, record_hash, format_time(end), _utc_iso(_now())))
                self._db.execute("commit")
            except BaseException:
                self._db.execute("rollback")
                raise
        return True

    def start_chain(self, camera: str) -> None:
        """A camera the collector has no record of starts its own chain at seq 1 (nothing to store: the
        absence of a `cameras` row means exactly that); remembered so the question is not asked again."""
        with self._lock:
            self._db.execute("insert or ignore into adoptions (camera, seq, record_hash, end_time, at) "
                             "values (?, 0, '', '', ?)", (camera, _utc_iso(_now())))

    def chain_known(self, camera: str) -> bool:
        """The journal knows where this camera's chain stands (it recorded, adopted or started it)."""
        with self._lock:
            return self._db.execute("select 1 from cameras where camera = ? union all "
                                    "select 1 from adoptions where camera = ? limit 1", (camera, camera)).fetchone() \
                is not None

    # --- disk budget (edge_agent.diskkeeper) ------------------------------------------------------
    def prunable(self, limit: int, created_before: datetime | None = None) -> list[Record]:
        """Acknowledged (`stored`) segments whose local file is not yet deleted, oldest first. Pending and
        rejected records are never returned: unacknowledged footage is never deleted."""
        sql = (f"select {_RECORD_COLS} from records where state = 'stored' and kind = 'segment' "
               "and path is not null and id not in (select record_id from pruned)")
        args: list[Any] = []
        if created_before is not None:
            sql += " and created_at < ?"
            args.append(_utc_iso(created_before))
        with self._lock:
            rows = self._db.execute(sql + " order by id limit ?", (*args, limit)).fetchall()
        return [_record(r) for r in rows]

    def mark_pruned(self, rowid: int, reason: str) -> None:
        with self._lock:
            self._db.execute("insert or ignore into pruned (record_id, at, reason) values (?,?,?)",
                             (rowid, _utc_iso(_now()), reason))

    def status(self) -> list[CameraStatus]:
        with self._lock:
            rows = self._db.execute(
                "select c.camera, c.last_seq, "
                "(select max(seq) from records r where r.camera = c.camera and r.state = 'stored'), "
                "(select count(*) from records r where r.camera = c.camera and r.state = 'pending'), "
                "(select coalesce(sum(size), 0) from records r where r.camera = c.camera and r.state = 'pending'), "
                "(select count(*) from records r where r.camera = c.camera and r.state = 'rejected') "
                "from cameras c order by c.camera").fetchall()
        return [CameraStatus(*row) for row in rows]

    # --- ffmpeg runs ----------------------------------------------------------------------------
    def set_run_anchor(self, camera: str, run_id: str, anchor: datetime) -> None:
        with self._lock:
            self._db.execute("insert or ignore into runs (camera, run_id, anchor) values (?,?,?)",
                             (camera, run_id, _utc_iso(anchor)))

    def run_anchor(self, camera: str, run_id: str) -> datetime | None:
        with self._lock:
            row = self._db.execute("select anchor from runs where camera = ? and run_id = ?",
                                   (camera, run_id)).fetchone()
        return datetime.fromisoformat(row[0]) if row else None


_RECORD_COLS = ("id, camera, seq, kind, file_id, manifest, signature, record_hash, size, path, state, reason")


def _candidate(row: Any) -> Candidate:
    # The journal's own canonical manifests: fromisoformat reads their times (about 100 times faster than
    # parse_time).
    return Candidate(row[0], row[1], datetime.fromisoformat(row[2]), datetime.fromisoformat(row[3]))


def _record(row: Any) -> Record:
    return Record(id=row[0], camera=row[1], seq=row[2], kind=row[3], file_id=row[4], manifest_json=row[5],
                  signature=row[6], record_hash=row[7], size=row[8], path=Path(row[9]) if row[9] else None,
                  state=row[10], reason=row[11])
