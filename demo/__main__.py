"""Record from two synthetic cameras, upload over a private mosquitto, store and verify; then show
what an inspector sees: the batch's coverage and a verified evidence package.

Runs the real commands (`exam-collector`, `exam-edge`) as separate processes, exactly as an operator
and a venue technician would, with everything under demo-data/ (removed at the start of each run):

    demo-data/mosquitto/   private broker (free port, anonymous, loopback only)
    demo-data/collector/   collector.toml, SQLite database, stored footage
    demo-data/edge/        edge.toml, agent.key, spool and journal
    demo-data/setup.log    output of the init/enroll steps
    demo-data/collector.log, demo-data/edge.log   output of `serve` and `run`

    demo-data/evidence/    the batch's evidence package (verify.py inside)

Exit code: the worst of `summary --verify`, `batches show`, `export` and the package's `verify.py`
(0 all verified and covered, 3 gaps, 4 integrity failure), 1 when a step fails, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "demo-data"
AGENT = "demo-venue-a"
INSTITUTION = "JL2201001"
VENUE = "JL2201001-01"
CAMERAS = (
    # id, room, room_kind, source
    ("t101-cam1", "T101", "theory", "lavfi:testsrc2=size=640x360:rate=25"),
    ("p201-cam1", "P201", "practical", "lavfi:testsrc2=size=640x360:rate=25"),
)
SEGMENT_SECONDS = 10
BATCH_ID = "JL2201001-DEMO-001"
SHANGHAI = ZoneInfo("Asia/Shanghai")
BATCH_LEAD_SECONDS = 8   # the batch window opens once the cameras surely record...
BATCH_TAIL_SECONDS = 4   # ...and closes before the agent stops
MIN_SECONDS = 20
DRAIN_TIMEOUT = 180  # seconds the agent may take after recording to upload its spool


class DemoError(Exception):
    """A step failed; `log` is where the details are."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def find_command(name: str) -> str:
    """The console script next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise DemoError(f"`{name}` is not installed: run `make venv` (pip install -e '.[test]') first")


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if not found:
        raise DemoError("mosquitto is not installed: run `make deps` (apt-get install mosquitto)")
    return found


class Demo:
    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.setup_log = DATA / "setup.log"
        self.collector_config = DATA / "collector" / "collector.toml"
        self.edge_config = DATA / "edge" / "edge.toml"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"

    # -- processes -------------------------------------------------------------------------------

    def step(self, what: str, argv: list[str]) -> str:
        """Run one setup command to completion; its output goes to setup.log, stdout is returned."""
        with self.setup_log.open("a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            done = subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120)
            log.write(done.stdout)
            log.write(done.stderr)
            log.write(f"[exit {done.returncode}]\n")
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise DemoError(f"{what} failed (exit {done.returncode}): {last}", self.setup_log)
        print(f"  ok  {what}")
        return done.stdout

    def spawn(self, name: str, argv: list[str], log: Path) -> subprocess.Popen:
        handle = log.open("ab")
        handle.write(f"$ {' '.join(argv)}\n".encode())
        handle.flush()
        process = subprocess.Popen(argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        self.children.append((name, process))
        return process

    def stop(self, process: subprocess.Popen, grace: float = 20.0) -> int:
        """SIGTERM to the process (it stops its own children, e.g. ffmpeg), SIGKILL after `grace`,
        then SIGKILL to whatever is left in its process group."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: start_new_session=True
        except (ProcessLookupError, PermissionError):
            pass
        return process.returncode

    def stop_all(self) -> None:
        for _name, process in reversed(self.children):
            self.stop(process, grace=10.0)

    # -- steps -----------------------------------------------------------------------------------

    def start_mosquitto(self) -> int:
        workdir = DATA / "mosquitto"
        workdir.mkdir(parents=True)
        port = free_port()
        config = workdir / "mosquitto.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "max_packet_size 1048576\n"
            "persistence false\n"
            f"log_dest file {workdir}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\nlog_type subscribe\n"
            # Started as root, mosquitto switches to the `mosquitto` user, which may not be able to enter
            # this folder's parents: it would then silently write no log.
            + ("user root\n" if os.geteuid() == 0 else ""))
        log = workdir / "mosquitto.log"
        process = self.spawn("mosquitto", [find_mosquitto(), "-c", str(config)], DATA / "mosquitto.out.log")
        deadline = time.monotonic() + 10
        while not port_open(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"mosquitto did not start on 127.0.0.1:{port}", log)
            time.sleep(0.05)
        print(f"  ok  private mosquitto on 127.0.0.1:{port}")
        return port

    def set_up_collector(self, broker: str, collector: str) -> None:
        config = ["--config", str(self.collector_config)]
        self.collector_config.parent.mkdir(parents=True, exist_ok=True)
        self.step("exam-collector init", [collector, *config, "init", "--data-dir", str(DATA / "collector"),
                                          "--broker", broker])
        self.move_http_listener()
        self.step("exam-collector db upgrade", [collector, *config, "db", "upgrade"])

    def move_http_listener(self) -> None:
        """The default 127.0.0.1:8080 may be taken on this machine: use a free port."""
        text = self.collector_config.read_text(encoding="utf-8")
        if "listen" not in tomllib.loads(text).get("http", {}):
            return
        pattern = re.compile(r'^(\s*listen\s*=\s*)"[^"]*"', re.MULTILINE)
        text, count = pattern.subn(rf'\g<1>"127.0.0.1:{free_port()}"', text, count=1)
        if count != 1:
            raise DemoError(f"cannot find `listen = \"...\"` in {rel(self.collector_config)} to move the HTTP port")
        self.collector_config.write_text(text, encoding="utf-8")

    def set_up_edge(self, broker: str, edge: str) -> str:
        config = ["--config", str(self.edge_config)]
        self.edge_config.parent.mkdir(parents=True, exist_ok=True)
        self.step("exam-edge init", [edge, *config, "init", "--agent", AGENT, "--institution", INSTITUTION,
                                     "--venue", VENUE, "--broker", broker, "--data-dir", str(DATA / "edge"),
                                     "--key-file", str(DATA / "edge" / "agent.key")])
        self.configure_edge()
        output = self.step("exam-edge pubkey", [edge, *config, "pubkey"])
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        if not lines:
            raise DemoError("exam-edge pubkey printed nothing", self.setup_log)
        return lines[-1]

    def configure_edge(self) -> None:
        """Shorter segments for a short demo, and two synthetic cameras (a theory and a practical room)."""
        text = self.edge_config.read_text(encoding="utf-8")
        current = tomllib.loads(text)
        recording = current.get("recording")
        if recording is None:
            text = text.rstrip("\n") + f"\n\n[recording]\nsegment_seconds = {SEGMENT_SECONDS}\n"
        elif recording.get("segment_seconds") != SEGMENT_SECONDS:
            pattern = re.compile(r"^(\s*segment_seconds\s*=\s*)\d+", re.MULTILINE)
            text, count = pattern.subn(rf"\g<1>{SEGMENT_SECONDS}", text, count=1)
            if count != 1:
                raise DemoError(f"cannot find `segment_seconds = N` in {rel(self.edge_config)}")
        if current.get("camera"):
            raise DemoError(f"{rel(self.edge_config)} already has [[camera]] tables; expected none after init")
        for camera, room, kind, source in CAMERAS:
            text = text.rstrip("\n") + (f'\n\n[[camera]]\nid = "{camera}"\nroom = "{room}"\n'
                                        f'room_kind = "{kind}"\nsource = "{source}"\n')
        written = tomllib.loads(text)
        if written["recording"]["segment_seconds"] != SEGMENT_SECONDS or len(written["camera"]) != len(CAMERAS):
            raise DemoError(f"editing {rel(self.edge_config)} went wrong; look at the file")
        self.edge_config.write_text(text, encoding="utf-8")
        print(f"  ok  edge config: segment_seconds = {SEGMENT_SECONDS}, cameras "
              + ", ".join(f"{c[0]} ({c[1]} {c[2]})" for c in CAMERAS))

    def wait_for_collector(self, process: subprocess.Popen, log: Path) -> None:
        """Ready when the broker has logged the collector's shared subscription."""
        broker_log = DATA / "mosquitto" / "mosquitto.log"  # written by start_mosquitto
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DemoError(f"exam-collector serve exited with {process.returncode}", log)
            if broker_log.exists() and "exam/v1/+/seg/#" in broker_log.read_text(errors="replace"):
                print("  ok  exam-collector serve is subscribed")
                return
            time.sleep(0.2)
        raise DemoError("exam-collector serve did not subscribe to exam/v1/+/seg/# within 30 s", log)

    def record(self, agent: subprocess.Popen, log: Path) -> None:
        started = time.monotonic()
        deadline = started + self.seconds + DRAIN_TIMEOUT
        interactive = sys.stdout.isatty()
        last_printed = -1
        while agent.poll() is None:
            elapsed = int(time.monotonic() - started)
            if elapsed <= self.seconds:
                line = f"recording {elapsed:3d}/{self.seconds} s (2 cameras, {SEGMENT_SECONDS} s segments)"
            else:
                line = f"recording done, uploading what is left ({elapsed - self.seconds} s)"
            if interactive:
                print(f"\r  ..  {line}   ", end="", flush=True)
            elif elapsed // 10 != last_printed:
                last_printed = elapsed // 10
                print(f"  ..  {line}", flush=True)
            if time.monotonic() > deadline:
                if interactive:
                    print()
                raise DemoError(f"exam-edge run still busy {DRAIN_TIMEOUT} s after recording ended", log)
            time.sleep(0.5)
        if interactive:
            print()
        if agent.returncode != 0:
            raise DemoError(f"exam-edge run exited with {agent.returncode}", log)
        print(f"  ok  exam-edge run finished after {time.monotonic() - started:.0f} s (uploads drained)")

    def run(self) -> int:
        if DATA.exists():
            shutil.rmtree(DATA)
        DATA.mkdir()
        collector = find_command("exam-collector")
        edge = find_command("exam-edge")
        print(f"exam-footage demo: {self.seconds} s from 2 synthetic cameras, everything under {rel(DATA)}/")

        broker = f"mqtt://127.0.0.1:{self.start_mosquitto()}"
        self.set_up_collector(broker, collector)
        pubkey = self.set_up_edge(broker, edge)
        self.step("exam-collector enroll", [collector, "--config", str(self.collector_config), "enroll",
                                            "--agent", AGENT, "--venue", VENUE, "--institution", INSTITUTION,
                                            "--pubkey", pubkey])

        collector_log = DATA / "collector.log"
        serve = self.spawn("collector", [collector, "--config", str(self.collector_config), "serve"], collector_log)
        self.wait_for_collector(serve, collector_log)

        # The exam-affairs system files the batch before the exam: its window starts once the cameras run.
        self.import_batch(collector, window_start=datetime.now(SHANGHAI) + timedelta(seconds=BATCH_LEAD_SECONDS))
        edge_log = DATA / "edge.log"
        agent = self.spawn("agent", [edge, "--config", str(self.edge_config), "run", "--duration",
                                     str(self.seconds)], edge_log)
        self.record(agent, edge_log)

        code = self.stop(serve)
        if code not in (0, -signal.SIGTERM):
            raise DemoError(f"exam-collector serve exited with {code} on SIGTERM", collector_log)
        print("  ok  exam-collector serve stopped")

        summary = self.show("exam-collector summary --verify", [collector, "--config", str(self.collector_config),
                                                                 "summary", "--verify"])
        coverage = self.show(f"exam-collector batches show {BATCH_ID}",
                             [collector, "--config", str(self.collector_config), "batches", "show", BATCH_ID])
        package = DATA / "evidence"
        exported = self.show(f"exam-collector export {BATCH_ID} --out {rel(package)} --reason ...",
                             [collector, "--config", str(self.collector_config), "export", BATCH_ID, "--out",
                              str(package), "--reason", "演示：督导抽查 (demo: inspector spot check)",
                              "--actor", "demo-inspector"])
        verified = (self.show(f"python3 {rel(package)}/verify.py {rel(package)}   # what a third party runs",
                              [sys.executable, str(package / "verify.py"), str(package)])
                    if exported == 0 else exported)
        codes = {"summary --verify": summary, "batches show": coverage, "export": exported, "verify.py": verified}
        worst = max(codes.values())
        verdict = {
            0: "OK: footage recorded, uploaded, stored and verified; the batch is fully covered; "
               "the evidence package verifies",
            3: "coverage gaps found (see above)",
            4: "INTEGRITY FAILURE: a hash, signature, chain link or file did not verify",
        }.get(worst, "a step failed: " + ", ".join(f"{k} exit {v}" for k, v in codes.items() if v))
        print(f"\ndemo: {verdict} (exit {worst}); logs and data in {rel(DATA)}/")
        return worst

    def show(self, title: str, argv: list[str]) -> int:
        """Run a command an inspector or operator would run and print its output as they would see it."""
        print(f"\n$ {title}")
        done = subprocess.run(argv, cwd=REPO, env=self.env, text=True, capture_output=True, timeout=600)
        sys.stdout.write(done.stderr)  # progress bars, then the result
        sys.stdout.write(done.stdout)
        sys.stdout.flush()
        return done.returncode

    def import_batch(self, collector: str, window_start: datetime) -> None:
        """One batch (批次) with a theory part in T101 and a practical part in P201, as the exam-affairs
        system exports it: CSV, naive Asia/Shanghai times."""
        window_end = window_start + timedelta(seconds=self.seconds - BATCH_LEAD_SECONDS - BATCH_TAIL_SECONDS)
        rows = ["batch_id,institution,venue,occupation,level,part,room,start,end"]
        for _camera, room, kind, _source in CAMERAS:
            rows.append(f"{BATCH_ID},{INSTITUTION},{VENUE},电工,四级,{kind},{room},"
                        f"{window_start:%Y-%m-%dT%H:%M:%S},{window_end:%Y-%m-%dT%H:%M:%S}")
        batch_file = DATA / "batches.csv"
        batch_file.write_text("\n".join(rows) + "\n", encoding="utf-8")
        self.step(f"exam-collector batches import {rel(batch_file)} (批次 {BATCH_ID}, "
                  f"{window_start:%H:%M:%S}–{window_end:%H:%M:%S} Asia/Shanghai)",
                  [collector, "--config", str(self.collector_config), "batches", "import", str(batch_file),
                   "--actor", "demo-exam-affairs"])


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Record from two synthetic cameras (a theory and a practical room), upload over a private "
                    "mosquitto to a collector, then verify every stored segment. Data and logs go to demo-data/, "
                    "which is removed at the start of each run.")
    parser.add_argument("--seconds", type=int, default=60, metavar="N",
                        help=f"how long the agent records (default 60; at least {MIN_SECONDS})")
    args = parser.parse_args(argv)
    if args.seconds < MIN_SECONDS:
        parser.error(f"--seconds {args.seconds} is too short for a batch window: give at least {MIN_SECONDS}")
    demo = Demo(args.seconds)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return demo.run()
    except DemoError as exc:
        where = f"; see {rel(exc.log)}" if exc.log else ""
        print(f"\ndemo: error: {exc}{where}", file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired as exc:
        print(f"\ndemo: error: `{' '.join(map(str, exc.cmd))}` did not finish in {exc.timeout:.0f} s; "
              f"see {rel(demo.setup_log)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        demo.stop_all()


if __name__ == "__main__":
    raise SystemExit(main())
