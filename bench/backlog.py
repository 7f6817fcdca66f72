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

Both sides are best of several: `--rounds N` outages one after the other with the same agent and collector
(default 2), then the baseline max(3, N) times on the same broker once agent and collector have stopped. Every
round's figures are printed with the best and the spread.

Run from the repo root:

    .venv/bin/python -m bench.backlog                     # 4 cameras, 2 x 10-minute outage
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
class Drain:
    """One outage and its drain."""
    outage_seconds: float
    backlog_records: int
    backlog_bytes: int
    reconnect_seconds: float
    drain_seconds: float
    peak_rss_mib: float

    @property
    def realtime_multiple(self) -> float:
        return self.outage_seconds / self.drain_seconds

    @property
    def mb_per_s(self) -> float:
        return self.backlog_bytes / 1e6 / self.drain_seconds


@dataclass(frozen=True)
class BacklogResult:
    cameras: int
    outage_seconds: float
    drains: tuple[Drain, ...]
    baselines_mb_per_s: tuple[float, ...]

    @property
    def best(self) -> Drain:
        return max(self.drains, key=lambda d: d.mb_per_s)

    @property
    def realtime_multiple(self) -> float:
        return max(d.realtime_multiple for d in self.drains)

    @property
    def mb_per_s(self) -> float:
        return self.best.mb_per_s

    @property
    def peak_rss_mib(self) -> float:
        return max(d.peak_rss_mib for d in self.drains)   # memory: the worst round, not the best

    @property
    def baseline_mb_per_s(self) -> float:
        return max(self.baselines_mb_per_s)

    @property
    def ratio_to_baseline(self) -> float:
        """Best drain MB/s / best baseline MB/s."""
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
        rate: int = 15, workdir: Path | None = None, rounds: int = 2) -> BacklogResult:
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
            agent_log = pipeline.root / "agent.log"
            drains: list[Drain] = []
            for round_no in range(1, max(1, rounds) + 1):
                print(f"backlog round {round_no}/{rounds}: broker down for {outage:.0f} s while {cameras} camera(s) "
                      "record ...", flush=True)
                connects = agent_log.read_text(errors="replace").count("connected to MQTT broker")
                broker.stop()
                time.sleep(outage)
                broker.start()
                back = time.monotonic()
                cutoff = datetime.now(timezone.utc).isoformat()
                backlog = [r for r in _journal(pipeline) if r[1] != "stored" and r[3] < cutoff]
                ids = {r[0] for r in backlog}
                reconnect = _wait(lambda n=connects: agent_log.read_text(errors="replace")
                                  .count("connected to MQTT broker") > n, 120, "the agent to reconnect")
                peak = 0.0

                def drained(ids: set = ids) -> bool:
                    nonlocal peak
                    peak = max(peak, _rss_mib(pipeline.agent_proc.pid) or 0.0)
                    return all(r[1] == "stored" for r in _journal(pipeline) if r[0] in ids)

                _wait(drained, 600, "the backlog to drain", interval=0.05)
                drain = Drain(outage, len(backlog), sum(r[2] for r in backlog), reconnect,
                              time.monotonic() - back, peak)
                drains.append(drain)
                print(f"  {drain.backlog_records} records, {drain.backlog_bytes / 1e6:.1f} MB stored "
                      f"{drain.drain_seconds:.1f} s after the restart (reconnect {drain.reconnect_seconds:.1f} s): "
                      f"{drain.realtime_multiple:.0f}x real time, {drain.mb_per_s:.1f} MB/s, agent peak "
                      f"{drain.peak_rss_mib:.0f} MiB", flush=True)
            pipeline.stop_agent(timeout=120)
            pipeline.stop_collector()
            # The baseline with agent and collector stopped, best of at least 3 (it takes seconds), same bytes.
            mib = max(64, max(d.backlog_bytes for d in drains) // 2**20 + 1)
            baselines = []
            for number in range(1, max(3, rounds) + 1):
                baselines.append(run_on_broker("127.0.0.1", broker.port, mib).mb_per_s)
                print(f"  raw MQTT baseline {number}: {mib} MiB at {baselines[-1]:.0f} MB/s", flush=True)
        finally:
            pipeline.close()
            broker.stop(kill=True)
    return BacklogResult(cameras=cameras, outage_seconds=outage, drains=tuple(drains),
                         baselines_mb_per_s=tuple(baselines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=600, help="broker outage in seconds (default 600)")
    parser.add_argument("--cameras", type=int, default=4, help="synthetic cameras (default 4)")
    parser.add_argument("--segment-seconds", type=int, default=60, help="segment length (default 60)")
    parser.add_argument("--size", default="640x480", help="camera picture size (default 640x480)")
    parser.add_argument("--rate", type=int, default=15, help="camera frame rate (default 15)")
    parser.add_argument("--rounds", type=int, default=2, help="outages one after the other; the best drain is "
                        "reported, and the baseline is best of max(3, rounds) (default 2)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = parser.parse_args(argv)
    try:
        result = run(args.outage, args.cameras, args.segment_seconds, args.size, args.rate, rounds=args.rounds)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    for line in summary(result):
        print(line)
    if args.json:
        print(json.dumps({"cameras": result.cameras, "outage_seconds": result.outage_seconds,
                          "drains": [d.__dict__ | {"realtime_multiple": d.realtime_multiple, "mb_per_s": d.mb_per_s}
                                     for d in result.drains],
                          "baselines_mb_per_s": result.baselines_mb_per_s,
                          "realtime_multiple": result.realtime_multiple, "mb_per_s": result.mb_per_s,
                          "baseline_mb_per_s": result.baseline_mb_per_s,
                          "ratio_to_baseline": result.ratio_to_baseline}))
    return 0


def _spread(values: list[float], unit: str) -> str:
    best, worst = max(values), min(values)
    rounds = ", ".join(f"{v:.1f}" for v in values)
    if len(values) < 2:
        return f"{rounds} {unit} (one round: no spread)"
    return f"{rounds} {unit} (best {best:.1f}; spread {worst:.1f}-{best:.1f}, worst {100 * (1 - worst / best):.0f} % below best)"


def summary(result: BacklogResult) -> list[str]:
    best = result.best
    drains = list(result.drains)
    return [
        f"backlog: {result.cameras} camera(s), {len(drains)} outage(s) of {result.outage_seconds:.0f} s; backlogs "
        + ", ".join(f"{d.backlog_records} records / {d.backlog_bytes / 1e6:.1f} MB" for d in drains),
        "backlog: agent reconnected " + ", ".join(f"{d.reconnect_seconds:.1f}" for d in drains) + " s after the "
        "broker came back; all stored " + ", ".join(f"{d.drain_seconds:.1f}" for d in drains) + " s after it came back",
        f"backlog: drain speed best {result.realtime_multiple:.0f}x real time (target >= 50x); rounds "
        + ", ".join(f"{d.realtime_multiple:.0f}x" for d in drains),
        "backlog: drain " + _spread([d.mb_per_s for d in drains], "MB/s"),
        "backlog: raw MQTT baseline, same broker, same run: " + _spread(list(result.baselines_mb_per_s), "MB/s"),
        f"backlog: drain / baseline = {result.ratio_to_baseline:.3f} = {best.mb_per_s:.1f} / "
        f"{result.baseline_mb_per_s:.0f} MB/s, best of {len(drains)} drain(s) and {len(result.baselines_mb_per_s)} "
        "baseline runs",
        f"backlog: agent peak VmRSS while draining {result.peak_rss_mib:.0f} MiB (highest of all rounds)",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
