"""Runs the real pipeline as an operator would: CLIs as subprocesses, one broker, one collector, one agent."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.support.seaweed import Bucket

BIN = Path(sys.executable).parent


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_cli(*args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@dataclass
class CameraSpec:
    id: str
    room: str
    room_kind: str
    source: str


@dataclass
class Pipeline:
    root: Path
    broker_url: str
    database_url: str | None = None
    agent: str = "jl2201001-01-a"
    institution: str = "JL2201001"
    venue: str = "JL2201001-01"
    segment_seconds: int = 10
    cameras: list[CameraSpec] = field(default_factory=list)
    s3: Bucket | None = None     # footage in this Object Lock bucket (`init --storage s3`), else on the filesystem
    collector_proc: subprocess.Popen | None = None
    agent_proc: subprocess.Popen | None = None

    @property
    def collector_config(self) -> Path:
        return self.root / "collector" / "collector.toml"

    @property
    def edge_config(self) -> Path:
        return self.root / "edge" / "edge.toml"

    @property
    def edge_data(self) -> Path:
        return self.root / "edge" / "data"

    def collector(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        return run_cli("exam-collector", "--config", str(self.collector_config), *args, **kw)

    def edge(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        return run_cli("exam-edge", "--config", str(self.edge_config), *args, **kw)

    def set_up(self) -> None:
        init = ["init", "--data-dir", str(self.root / "collector"), "--broker", self.broker_url]
        if self.database_url:
            init += ["--database-url", self.database_url]
        if self.s3 is not None:
            init += ["--storage", "s3", "--s3-endpoint", self.s3.endpoint, "--s3-bucket", self.s3.name,
                     "--s3-credentials-file", str(self.s3.credentials_file(self.root))]
        self.collector(*init)
        self.collector("db", "upgrade")
        self.set_up_edge()

    def set_up_edge(self, replace: bool = False) -> None:
        """`exam-edge init` (a new key), the cameras, and the enrolment of the new key (`--replace`: a venue
        machine replaced, its journal and key gone)."""
        self.edge("init", "--agent", self.agent, "--institution", self.institution, "--venue", self.venue,
                  "--broker", self.broker_url, "--data-dir", str(self.edge_data),
                  "--key-file", str(self.root / "edge" / "agent.key"))
        text = self.edge_config.read_text()
        text, count = re.subn(r"(?m)^segment_seconds\s*=\s*\d+", f"segment_seconds = {self.segment_seconds}", text)
        assert count == 1, "edge init wrote no active segment_seconds line"
        for cam in self.cameras:
            text += (f'\n[[camera]]\nid = "{cam.id}"\nroom = "{cam.room}"\nroom_kind = "{cam.room_kind}"\n'
                     f'source = "{cam.source}"\n')
        self.edge_config.write_text(text)
        pubkey = self.edge("pubkey").stdout.strip()
        self.collector("enroll", "--agent", self.agent, "--venue", self.venue, "--institution", self.institution,
                       "--pubkey", pubkey, *(["--replace"] if replace else []))

    def replace_edge_machine(self) -> None:
        """The venue machine is replaced (or re-imaged): config, key, journal and spool are gone."""
        shutil.rmtree(self.root / "edge")
        self.set_up_edge(replace=True)

    def start_collector(self) -> None:
        log = open(self.root / "collector.log", "ab")
        self.collector_proc = subprocess.Popen(
            [str(BIN / "exam-collector"), "--config", str(self.collector_config), "serve"],
            stdout=log, stderr=subprocess.STDOUT)

    def start_agent(self, *extra: str) -> None:
        log = open(self.root / "agent.log", "ab")
        self.agent_proc = subprocess.Popen(
            [str(BIN / "exam-edge"), "--config", str(self.edge_config), "run", *extra],
            stdout=log, stderr=subprocess.STDOUT)

    def stop_agent(self, timeout: float = 120) -> int:
        return _stop(self.agent_proc, timeout)

    def stop_collector(self, timeout: float = 30) -> int:
        return _stop(self.collector_proc, timeout)

    def close(self) -> None:
        for proc in (self.agent_proc, self.collector_proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        out = []
        for name in ("agent.log", "collector.log"):
            path = self.root / name
            if path.exists():
                out.append(f"--- {name} (tail) ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-60:]))
        return "\n".join(out)


def _stop(proc: subprocess.Popen | None, timeout: float) -> int:
    if proc is None:
        return 0
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def read_journal(journal: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of an edge journal, read-only while the agent runs; none yet if the agent has not created it
    (the file can exist a moment before its tables do)."""
    if not journal.exists():
        return []
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        db.close()


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
