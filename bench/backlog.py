"""Backlog drain after a broker outage (issue 3, acceptance 2): how fast a venue catches up.

The real CLIs on one machine: a private mosquitto, `exam-collector serve` (SQLite), `exam-edge run` with N
synthetic cameras (lavfi, live-paced, H.264). Once the first segments are stored the broker is stopped for
`--outage` seconds (default 600, ten minutes) while the cameras keep recording into the spool; then it is
started again. The clock runs from the broker's restart until every record sealed before that moment is
acknowledged (`stored`) by the collector. It prints

- the drain speed as a multiple of real time: outage seconds / drain seconds (target >= 50x for 4 cameras),
- the drain throughput in MB/s and as a ratio to the raw MQTT baseline measured on the same broker in the
  same run (bench.mqtt_baseline, 256 KiB messages, same byte count, at least 64 MiB),
- the agent's peak VmRSS while draining (from /proc).

Run from the repo root:

    .venv/bin/python -m bench.backlog                     # 4 cameras, 10-minute outage
    .venv/bin/python -m bench.backlog --outage 60         # a quick look
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench.mqtt_baseline import BenchError, run_on_broker
from tests.integration.test_store_forward import disable_health
from tests.support.pipeline import CameraSpec, Pipeline
from tests.support.services import Mosquitto, free_port, mosquitto_binary


@dataclass(frozen=True)
class BacklogResult:
    cameras: int
    outage_seconds: float
    backlog_records: int
    backlog_bytes: int
    reconnect_seconds: float
    drain_seconds: float
    peak_rss_mib: float
    baseline_mb_per_s: float

    @property
    def realtime_multiple(self) -> float:
        return self.outage_seconds / self.drain_seconds

    @property
    def mb_per_s(self) -> float:
        return self.backlog_bytes / 1e6 / self.drain_seconds

    @property
    def ratio_to_baseline(self) -> float:
        return self.mb_per_s / self.baseline_mb_per_s


def _journal(pipeline: Pipeline) -> list[tuple]:
    path = pipeline.edge_data / "journal.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("select id, state, size, created_at from records order by id").fetchall()
    finally:
        db.close()


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _wait(predicate, timeout: float, what: str, interval: float = 0.2) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


def run(outage: float = 600, cameras: int = 4, segment_seconds: int = 60, size: str = "640x480",
        rate: int = 15, workdir: Path | None = None) -> BacklogResult:
    if mosquitto_binary() is None:
        raise BenchError("mosquitto is not installed; run `make deps`")
    with tempfile.TemporaryDirectory(prefix="bench-backlog-", dir=workdir) as tmp:
        root = Path(tmp)
        broker = Mosquitto(workdir=root / "mosquitto")
        broker.start()
        specs = [CameraSpec(f"bench-c{i + 1}", f"R{i // 2 + 1:03d}", "theory",
                            f"lavfi:testsrc2=size={size}:rate={rate}") for i in range(cameras)]
        pipeline = Pipeline(root, broker.url, database_url=f"sqlite:///{root / 'collector' / 'collector.db'}",
                            segment_seconds=segment_seconds, cameras=specs)
        try:
            pipeline.set_up()
            disable_health(pipeline.edge_config)
            text = re.sub(r"(?m)^listen = .*$", f'listen = "127.0.0.1:{free_port()}"',
                          pipeline.collector_config.read_text())
            pipeline.collector_config.write_text(text)
            pipeline.start_collector()
            pipeline.start_agent("--drain-seconds", "60")
            _wait(lambda: any(r[1] == "stored" for r in _journal(pipeline)), segment_seconds * 3 + 60,
                  "the first stored segment")
            print(f"backlog: broker down for {outage:.0f} s while {cameras} camera(s) record ...", flush=True)
            broker.stop()
            time.sleep(outage)
            broker.start()
            back = time.monotonic()
            cutoff = datetime.now(timezone.utc).isoformat()
            backlog = [r for r in _journal(pipeline) if r[1] != "stored" and r[3] < cutoff]
            ids = {r[0] for r in backlog}
            agent_log = pipeline.root / "agent.log"
            reconnect = _wait(lambda: agent_log.read_text(errors="replace").count("connected to MQTT broker") >= 2,
                              120, "the agent to reconnect")
            peak = 0.0

            def drained() -> bool:
                nonlocal peak
                peak = max(peak, _rss_mib(pipeline.agent_proc.pid) or 0.0)
                return all(r[1] == "stored" for r in _journal(pipeline) if r[0] in ids)

            _wait(drained, 600, "the backlog to drain", interval=0.05)
            drain = time.monotonic() - back
            pipeline.stop_agent(timeout=120)
            pipeline.stop_collector()
            total = sum(r[2] for r in backlog)
            baseline = run_on_broker("127.0.0.1", broker.port, max(64, total // 2**20 + 1)).mb_per_s
        finally:
            pipeline.close()
            broker.stop(kill=True)
    return BacklogResult(cameras=cameras, outage_seconds=outage, backlog_records=len(backlog),
                         backlog_bytes=total, reconnect_seconds=reconnect, drain_seconds=drain,
                         peak_rss_mib=peak, baseline_mb_per_s=baseline)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=600, help="broker outage in seconds (default 600)")
    parser.add_argument("--cameras", type=int, default=4, help="synthetic cameras (default 4)")
    parser.add_argument("--segment-seconds", type=int, default=60, help="segment length (default 60)")
    parser.add_argument("--size", default="640x480", help="camera picture size (default 640x480)")
    parser.add_argument("--rate", type=int, default=15, help="camera frame rate (default 15)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = parser.parse_args(argv)
    try:
        result = run(args.outage, args.cameras, args.segment_seconds, args.size, args.rate)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    print(f"backlog: {result.backlog_records} records, {result.backlog_bytes / 1e6:.1f} MB from {result.cameras} "
          f"camera(s) after a {result.outage_seconds:.0f} s outage")
    print(f"backlog: agent reconnected {result.reconnect_seconds:.1f} s after the broker came back; all stored "
          f"{result.drain_seconds:.1f} s after it came back")
    print(f"backlog: drain speed {result.realtime_multiple:.0f}x real time (target >= 50x); "
          f"{result.mb_per_s:.1f} MB/s = {result.ratio_to_baseline:.3f} x raw MQTT baseline "
          f"({result.baseline_mb_per_s:.0f} MB/s, same broker, same run)")
    print(f"backlog: agent peak VmRSS while draining {result.peak_rss_mib:.0f} MiB")
    if args.json:
        print(json.dumps(result.__dict__ | {"realtime_multiple": result.realtime_multiple,
                                            "ratio_to_baseline": result.ratio_to_baseline}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
