"""The spool: a durable SQLite journal of signed records, and the sealer that turns files into records.

Sealing order, safe across SIGKILL at any point:
1. probe and hash the file where ffmpeg left it (recording/),
2. build and sign the manifest (seq = last + 1, prev = last record hash),
3. one transaction (synchronous=FULL): insert the record with its source and final paths, bump the camera,
4. rename the file into spool/{camera}/ under its final name, fsync the directory, mark it moved.
A crash after 3 leaves a journaled record whose file is still in recording/: `recover()` finishes the move.
A crash before 3 leaves an unjournaled file in recording/: it is sealed again at restart (same seq).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import queue
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exam_contract.canonical import canonical_bytes, format_time, parse_time, sha256_hex, truncate_to_millis
from exam_contract.files import fsync_dir, hash_file
from exam_contract.manifest import ClockInfo, Manifest, VideoInfo, segment_file_name
from exam_contract.signing import sign, verify

from .config import CameraConfig, EdgeConfig

log = logging.getLogger(__name__)

UTC = timezone.utc
SEGMENT_SUFFIX = ".ts"

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


def _record(row: Any) -> Record:
    return Record(id=row[0], camera=row[1], seq=row[2], kind=row[3], file_id=row[4], manifest_json=row[5],
                  signature=row[6], record_hash=row[7], size=row[8], path=Path(row[9]) if row[9] else None,
                  state=row[10], reason=row[11])


# --- probing and hashing ------------------------------------------------------------------------

class ProbeError(Exception):
    """ffprobe cannot read a segment."""


@dataclass(frozen=True)
class ProbeResult:
    duration: float
    start_time: float | None
    video: VideoInfo


def probe_segment(path: Path, timeout: float = 60) -> ProbeResult:
    try:
        result = subprocess.run(["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)],
                                capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProbeError(f"ffprobe failed on {path.name}: {exc}") from exc
    if result.returncode != 0:
        last = (result.stderr.decode(errors="replace").strip().splitlines() or ["exit %d" % result.returncode])[-1]
        raise ProbeError(f"ffprobe cannot read {path.name}: {last}")
    try:
        info = json.loads(result.stdout)
        fmt = info.get("format") or {}
        video = next(s for s in info.get("streams", []) if s.get("codec_type") == "video")
        duration = float(fmt["duration"])
    except (ValueError, KeyError, StopIteration, TypeError) as exc:
        raise ProbeError(f"ffprobe found no video duration in {path.name}") from exc
    if not duration > 0 or not video.get("width"):
        raise ProbeError(f"ffprobe found no video frames in {path.name}")
    fps = 0.0
    for key in ("avg_frame_rate", "r_frame_rate"):
        try:
            value = Fraction(video.get(key, "0/0"))
        except (ValueError, ZeroDivisionError):
            continue
        if value > 0:
            fps = round(float(value), 3)
            break
    start = fmt.get("start_time")
    return ProbeResult(duration=round(duration, 6), start_time=float(start) if start is not None else None,
                       video=VideoInfo(codec=str(video.get("codec_name", "unknown")), width=int(video["width"]),
                                       height=int(video["height"]), fps=fps))


MPEG_TS_SYNC = 0x47


def _starts_like_mpegts(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(189)
    except OSError:
        return False
    return len(head) == 189 and head[0] == MPEG_TS_SYNC and head[188] == MPEG_TS_SYNC


# --- recording file names and segment lists -----------------------------------------------------

def recording_name(run_id: str) -> str:
    """ffmpeg's output pattern inside recording/{camera}/ (index filled in by the segment muxer)."""
    return f"{run_id}-%06d{SEGMENT_SUFFIX}"


def segment_list_name(run_id: str) -> str:
    return f"{run_id}.csv"


def parse_recording_name(name: str) -> tuple[str, int] | None:
    if not name.endswith(SEGMENT_SUFFIX):
        return None
    stem = name[: -len(SEGMENT_SUFFIX)]
    run_id, sep, index = stem.rpartition("-")
    if not sep or not run_id or not index.isdigit():
        return None
    return run_id, int(index)


def read_segment_list(path: Path) -> dict[str, tuple[float, float]]:
    """name -> (start, end) seconds on the run's output timeline, from ffmpeg's CSV segment list."""
    entries: dict[str, tuple[float, float]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.reader(handle):
                if len(row) >= 3:
                    try:
                        entries[os.path.basename(row[0])] = (float(row[1]), float(row[2]))
                    except ValueError:
                        continue  # a half-written last line
    except FileNotFoundError:
        pass
    return entries


def parse_final_name(camera: str, name: str) -> datetime | None:
    prefix = f"{camera}@"
    if not name.startswith(prefix) or not name.endswith(SEGMENT_SUFFIX):
        return None
    stamp = name[len(prefix): -len(SEGMENT_SUFFIX)]
    try:
        return datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def open_by_any_process(path: Path) -> bool:
    """True when some process (e.g. an ffmpeg still running) holds `path` open."""
    target = str(path.resolve())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return True
            except OSError:
                continue
    return False


ORPHAN_WAIT_SECONDS = 20.0


def _open_by_self(path: Path) -> bool:
    target = str(path.resolve())
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def _wait_closed(path: Path, timeout: float) -> bool:
    """After a SIGKILLed agent its ffmpeg gets SIGTERM (PDEATHSIG) and closes its last segment a moment
    later: wait for that (bounded) so the segment is sealed before the new run's, in time order."""
    if _open_by_self(path):  # our own writer, not an orphan: nothing to wait for
        return False
    deadline = time.monotonic() + timeout
    while open_by_any_process(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


# --- the sealer ---------------------------------------------------------------------------------

class RunInfo(Protocol):
    """What the recorders tell the sealer about an ffmpeg run."""

    def anchor(self, camera: str, run_id: str) -> datetime | None: ...

    def is_live(self, camera: str, run_id: str) -> bool: ...

    def video(self, camera: str, run_id: str) -> VideoInfo | None:
        """The stream the run writes, as ffmpeg reported it (None when unknown)."""
        ...


class JournalRuns:
    """RunInfo from the journal only (no live recorders, e.g. at startup)."""

    def __init__(self, journal: Journal):
        self._journal = journal

    def anchor(self, camera: str, run_id: str) -> datetime | None:
        return self._journal.run_anchor(camera, run_id)

    def is_live(self, camera: str, run_id: str) -> bool:
        return False

    def video(self, camera: str, run_id: str) -> VideoInfo | None:
        return None


@dataclass(frozen=True)
class _Outage:
    cause: str
    detail: str | None


class Sealer:
    """Seals finished segment files and stated gaps into signed journal records, one at a time.

    Work arrives on a queue (from the watcher and the recorders) and is done by one thread in order, so
    the records of a camera follow the order in which its files were finished.
    """

    def __init__(self, config: EdgeConfig, journal: Journal, key: Ed25519PrivateKey,
                 clock: Callable[[], ClockInfo] = ClockInfo, runs: RunInfo | None = None,
                 on_sealed: Callable[[Record], None] | None = None, list_wait: float = 3.0):
        self.config = config
        self.journal = journal
        self._key = key
        self._clock = clock
        self.runs: RunInfo = runs or JournalRuns(journal)
        self._on_sealed = on_sealed
        self._list_wait = list_wait
        # Frame health flags for a segment's manifest (edge_agent.health); must not raise.
        self.health_check: Callable[[CameraConfig, Path, datetime, VideoInfo], tuple[str, ...]] | None = None
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._outages: dict[str, _Outage] = {}
        # (camera, run_id) -> the stream as ffprobe read it from the run's first listed segment
        self._run_video: dict[tuple[str, str], VideoInfo] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        for cam in config.cameras:
            (config.agent.spool_dir / cam.id).mkdir(parents=True, exist_ok=True)
            (config.agent.recording_dir / cam.id).mkdir(parents=True, exist_ok=True)

    # --- queue interface (thread-safe) ---
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sealer", daemon=True)
        self._thread.start()

    def submit_segment(self, camera: str, path: Path) -> None:
        self._queue.put(("segment", (camera, Path(path))))

    def submit_run_finished(self, camera: str, run_id: str) -> None:
        """ffmpeg of this run has exited: seal whatever of it is left (its partial last segment)."""
        self._queue.put(("run", (camera, run_id)))

    def submit_outage(self, camera: str, cause: str, detail: str | None) -> None:
        """The camera stopped recording; a gap record up to its next segment's start follows."""
        self._queue.put(("outage", (camera, cause, detail)))

    def stop(self, timeout: float = 60) -> None:
        """Finish the queued work, then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, args = item
            try:
                if kind == "segment":
                    self.seal_file(*args)
                elif kind == "run":
                    self.seal_run(*args)
                elif kind == "outage":
                    self.note_outage(*args)
            except Exception:  # noqa: BLE001 - the sealer thread must survive one bad file
                log.exception("sealer: %s %s failed", kind, args)

    # --- synchronous work (sealer thread, or startup before the thread runs) ---
    def note_outage(self, camera: str, cause: str, detail: str | None) -> None:
        with self._lock:
            if camera not in self._outages:  # the first cause of an outage names it
                self._outages[camera] = _Outage(cause, detail)
                log.warning("camera %s: recording interrupted (%s): %s", camera, cause, detail or "")

    def pending_outage(self, camera: str) -> str | None:
        with self._lock:
            outage = self._outages.get(camera)
        return outage.cause if outage else None

    def close_outages(self, end: datetime | None = None) -> None:
        """At shutdown: state the still open outages as gaps up to `end` (now)."""
        end = truncate_to_millis(end or _now())
        with self._lock:
            outages, self._outages = dict(self._outages), {}
        for camera, outage in outages.items():
            state = self.journal.camera_state(camera)
            if state.last_end is not None and end > state.last_end:
                self._append_gap(self._camera(camera), state.last_end, end, outage.cause, outage.detail)

    def recover(self) -> None:
        """At startup: finish interrupted moves, seal leftovers in recording/ and unjournaled files in spool/.
        The agent was not running since its last record's end: an outage is noted first, so that a leftover
        of a run that started after an earlier restart (and was killed before its first segment was sealed)
        is preceded by the agent_stopped gap the dead process never got to write."""
        for cam in self.config.cameras:
            if self.journal.camera_state(cam.id).last_end is not None:
                self.note_outage(cam.id, "agent_stopped", "the edge agent was not recording")
        for rowid, src, dst in self.journal.unmoved():
            if dst.exists():
                self.journal.set_moved(rowid)
            elif src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
                fsync_dir(dst.parent)
                self.journal.set_moved(rowid)
                log.info("recovered interrupted move of %s", dst.name)
            else:
                log.error("journal record %s: file %s is lost (neither in recording nor spool)", rowid, dst)
        for cam in self.config.cameras:
            spool = self.config.agent.spool_dir / cam.id
            for path in sorted(spool.glob(f"*{SEGMENT_SUFFIX}")):
                if not self.journal.is_journaled(path):
                    start = parse_final_name(cam.id, path.name)
                    if start is not None:
                        log.warning("camera %s: sealing unjournaled spool file %s", cam.id, path.name)
                        self._seal_at(cam, path, start, None)
            rec_dir = self.config.agent.recording_dir / cam.id
            runs: set[str] = set()
            for path in sorted(rec_dir.glob(f"*{SEGMENT_SUFFIX}"), key=_recording_sort_key):
                parsed = parse_recording_name(path.name)
                if parsed is None:
                    continue
                runs.add(parsed[0])
                if not _wait_closed(path, ORPHAN_WAIT_SECONDS):
                    log.warning("camera %s: %s is still open by another process; not sealing it", cam.id, path.name)
                    continue
                self.seal_file(cam.id, path)
            for run_id in runs:
                self._drop_finished_list(cam.id, run_id)

    def seal_run(self, camera: str, run_id: str) -> None:
        rec_dir = self.config.agent.recording_dir / camera
        for path in sorted(rec_dir.glob(f"{run_id}-*{SEGMENT_SUFFIX}"), key=_recording_sort_key):
            self.seal_file(camera, path)
        self._drop_finished_list(camera, run_id)

    def seal_file(self, camera: str, path: Path) -> Record | None:
        """Seal one finished recording file (idempotent: a missing or journaled file is skipped)."""
        path = Path(path)
        if not path.exists() or self.journal.is_journaled(path):
            return None
        try:
            cam = self._camera(camera)
        except KeyError:
            log.warning("file %s belongs to camera %s which is not configured; leaving it", path, camera)
            return None
        parsed = parse_recording_name(path.name)
        if parsed is None:
            log.warning("camera %s: %s is not a recording file name; leaving it", camera, path.name)
            return None
        run_id, index = parsed
        entries = self._segment_list(camera, path, run_id)
        try:
            probe: ProbeResult | None = self._probe(camera, run_id, path, entries.get(path.name))
        except ProbeError as exc:
            probe = None
            problem = str(exc)
        start, end = self._segment_times(camera, path, run_id, index, entries, probe)
        if probe is None:
            return self._seal_corrupt(cam, path, start, end, problem)
        return self._seal_at(cam, path, start, probe, end)

    # --- internals ---
    def _camera(self, camera: str) -> CameraConfig:
        return self.config.camera(camera)

    def _segment_list(self, camera: str, path: Path, run_id: str) -> dict[str, tuple[float, float]]:
        """The run's segment list; for a live run, wait briefly for ffmpeg to list the file it just closed."""
        list_path = path.parent / segment_list_name(run_id)
        entries = read_segment_list(list_path)
        if path.name not in entries and self.runs.is_live(camera, run_id):
            deadline = time.monotonic() + self._list_wait
            while path.name not in entries and time.monotonic() < deadline and self.runs.is_live(camera, run_id):
                time.sleep(0.05)
                entries = read_segment_list(list_path)
        return entries

    def _probe(self, camera: str, run_id: str, path: Path, listed: tuple[float, float] | None) -> ProbeResult:
        """The segment's duration and stream. ffmpeg lists a segment only once it has closed it, with its
        start and end on the run's timeline, and every segment of a run carries the stream ffmpeg reported
        when it opened its output. So a listed segment needs no ffprobe (a process costs about 0.1 CPU-s,
        as much as the agent's own work on a segment); ffprobe reads unlisted (partial) segments, and listed
        ones when ffmpeg's report is unknown (after a restart of the agent), once per run."""
        key = (camera, run_id)
        video = self._run_video.get(key)
        if video is None and (video := self.runs.video(camera, run_id)) is not None:
            self._run_video[key] = video
        if listed is not None and video is not None and listed[1] > listed[0] and _starts_like_mpegts(path):
            return ProbeResult(duration=round(listed[1] - listed[0], 6), start_time=listed[0], video=video)
        probe = probe_segment(path)
        if listed is not None:
            self._run_video[key] = probe.video
        return probe

    def _segment_times(self, camera: str, path: Path, run_id: str, index: int,
                       entries: dict[str, tuple[float, float]], probe: ProbeResult | None) -> tuple[datetime, datetime]:
        """Wall-clock [start, end) of a recording file: the run's anchor (wall time of its output timeline's
        zero) plus the segment's start and end on that timeline from ffmpeg's segment list. Consecutive
        segments of one run share the boundary value, so they are contiguous by construction."""
        anchor = self.runs.anchor(camera, run_id)
        duration = probe.duration if probe else 0.0
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        if anchor is None:
            # The run died before its clock was anchored: the file's last write is its end.
            end = truncate_to_millis(mtime)
            return truncate_to_millis(end - timedelta(seconds=duration)), end
        if path.name in entries:
            s, e = entries[path.name]
            return (truncate_to_millis(anchor + timedelta(seconds=s)),
                    truncate_to_millis(anchor + timedelta(seconds=e)))
        # Partial segment (ffmpeg died while writing it): it starts where the run's previous one ended.
        earlier = [e for name, (_, e) in entries.items()
                   if (p := parse_recording_name(name)) is not None and p[1] < index]
        start = truncate_to_millis(anchor + timedelta(seconds=max(earlier) if earlier else 0.0))
        if probe is None:
            return start, max(start, truncate_to_millis(mtime))
        return start, truncate_to_millis(start + timedelta(seconds=duration))

    def _resolve_outage(self, cam: CameraConfig, start: datetime) -> None:
        with self._lock:
            outage = self._outages.pop(cam.id, None)
        if outage is None:
            return
        state = self.journal.camera_state(cam.id)
        if state.last_end is not None and start > state.last_end:
            self._append_gap(cam, state.last_end, start, outage.cause, outage.detail)

    def _base(self, cam: CameraConfig) -> dict[str, Any]:
        agent = self.config.agent
        return {"agent": agent.id, "institution": agent.institution, "venue": agent.venue, "room": cam.room,
                "room_kind": cam.room_kind, "camera": cam.id}

    def _append_gap(self, cam: CameraConfig, start: datetime, end: datetime, cause: str,
                    detail: str | None) -> Record:
        state = self.journal.camera_state(cam.id)
        manifest = Manifest(kind="gap", **self._base(cam), seq=state.last_seq + 1, start=start, end=end,
                            duration=round((end - start).total_seconds(), 3), size=0, sha256=None,
                            prev=state.last_hash, clock=self._clock(), cause=cause, detail=detail)
        record = self.journal.append(manifest, sign(self._key, manifest.canonical()), None, None)
        log.warning("camera %s seq %s gap %s..%s (%s)", cam.id, manifest.seq, format_time(start),
                    format_time(end), cause)
        self._sealed(record)
        return record

    def _seal_corrupt(self, cam: CameraConfig, path: Path, start: datetime, end: datetime,
                      problem: str) -> Record | None:
        self._resolve_outage(cam, start)
        keep_dir = self.config.agent.corrupt_dir / cam.id
        keep_dir.mkdir(parents=True, exist_ok=True)
        target = keep_dir / path.name
        record = None
        if end > start:
            record = self._append_gap(cam, start, end, "corrupt_segment", f"{path.name}: {problem}")
        os.replace(path, target)
        fsync_dir(keep_dir)
        log.error("camera %s: unreadable segment %s kept in %s (%s)", cam.id, path.name, keep_dir, problem)
        return record

    def _seal_at(self, cam: CameraConfig, path: Path, start: datetime, probe: ProbeResult | None,
                 end: datetime | None = None) -> Record | None:
        if probe is None:
            try:
                probe = probe_segment(path)
            except ProbeError as exc:
                log.error("camera %s: %s", cam.id, exc)
                return None
        end = end or truncate_to_millis(start + timedelta(seconds=probe.duration))
        self._resolve_outage(cam, start)
        digest, size = hash_file(path, fsync=True)
        state = self.journal.camera_state(cam.id)
        manifest = Manifest(kind="segment", **self._base(cam), seq=state.last_seq + 1, start=start,
                            end=max(end, start), duration=probe.duration, size=size, sha256=digest,
                            prev=state.last_hash, video=probe.video, clock=self._clock(),
                            health=self.health_check(cam, path, start, probe.video) if self.health_check else ())
        spool = self.config.agent.spool_dir / cam.id
        spool.mkdir(parents=True, exist_ok=True)
        final = spool / segment_file_name(cam.id, start)
        if final.exists() and final != path:
            final = spool / segment_file_name(cam.id, start).replace(SEGMENT_SUFFIX, f"-{manifest.seq}{SEGMENT_SUFFIX}")
        record = self.journal.append(manifest, sign(self._key, manifest.canonical()), final, path)
        if final != path:
            os.replace(path, final)
            fsync_dir(spool)
            self.journal.set_moved(record.id)
        log.info("camera %s seq %s sealed %s (%.3f s, %d bytes)", cam.id, manifest.seq, final.name,
                 probe.duration, size)
        self._sealed(record)
        return record

    def _sealed(self, record: Record) -> None:
        if self._on_sealed is not None:
            try:
                self._on_sealed(record)
            except Exception:  # noqa: BLE001
                log.exception("on_sealed callback failed")

    def _drop_finished_list(self, camera: str, run_id: str) -> None:
        if self.runs.is_live(camera, run_id):
            return
        self._run_video.pop((camera, run_id), None)
        rec_dir = self.config.agent.recording_dir / camera
        if not any(rec_dir.glob(f"{run_id}-*{SEGMENT_SUFFIX}")):
            try:
                (rec_dir / segment_list_name(run_id)).unlink()
            except FileNotFoundError:
                pass


def _recording_sort_key(path: Path) -> tuple[str, int]:
    parsed = parse_recording_name(path.name)
    return parsed if parsed else (path.name, 0)


__all__ = ["Journal", "JournalError", "Record", "CameraState", "CameraStatus", "Sealer", "ProbeError",
           "ProbeResult", "probe_segment", "hash_file", "canonical_bytes", "recording_name",
           "segment_list_name", "parse_recording_name", "read_segment_list", "open_by_any_process"]
