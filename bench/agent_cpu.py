"""CPU cost of the edge agent: `exam-edge run` (agent + its ffmpegs + ffprobe + analysis) ÷ bare ffmpeg segmenting.

Eight "real-time" cameras: a 1080p25 H.264 file (2 s GOP, ~3 Mbit/s, like an IP camera) read with `-re`
and recorded by stream copy, exactly as the agent records a `source = "/path/file.ts"` camera. The baseline
runs the agent's own ffmpeg command lines (edge_agent.recorder.build_command) with nothing else. Then the
agent runs the same cameras with frame-health analysis off and on, uploading to a private mosquitto (no
collector: each segment is sent once). CPU is user+system time of the process tree (getrusage of waited
children), so the other load on the machine does not count (though it still adds noise: cache, frequency).

`--rounds N` runs bare, off and on N times, interleaved; each keeps its least CPU. Besides the ratios it prints
the absolute figures: the agent's overhead over bare ffmpeg in CPU-seconds per camera-hour (least agent minus
least bare, and per round), bare ffmpeg's own CPU-seconds per camera-hour, and bare ffmpeg's spread across
rounds. A ratio that improves while bare ffmpeg costs far more than on an earlier run (a slow machine) is not
an improvement unless the overhead per camera-hour fell too.

    .venv/bin/python -m bench.agent_cpu [--cameras 8] [--seconds 180] [--segment-seconds 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edge_agent.config import load_config
from edge_agent.recorder import build_command, new_run_id
from tests.support.services import Mosquitto, mosquitto_binary

BIN = Path(sys.executable).parent
TARGET_OFF, TARGET_ON = 1.3, 3.0


@dataclass(frozen=True)
class Cost:
    cpu: float  # CPU-seconds of the whole process tree
    own: float | None = None  # of the agent's Python process alone


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_source(path: Path, seconds: int = 20) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=1920x1080:rate=25", "-t", str(seconds), "-c:v", "libx264", "-preset",
                    "ultrafast", "-b:v", "3M", "-maxrate", "3M", "-bufsize", "6M", "-g", "50",
                    "-pix_fmt", "yuv420p", "-f", "mpegts", str(path)], check=True)


def write_config(root: Path, broker_url: str, source: Path, cameras: int, segment_seconds: int,
                 health: bool) -> Path:
    from exam_contract.signing import generate_private_key

    root.mkdir(parents=True, exist_ok=True)
    key = root / "agent.key"
    if not key.exists():
        generate_private_key(key)
    text = (f'[agent]\nid = "bench-agent"\ninstitution = "JL2201001"\nvenue = "JL2201001-01"\n'
            f'data_dir = "{root / "data"}"\nkey_file = "{key}"\n\n[mqtt]\nurl = "{broker_url}"\n\n'
            f'[recording]\nsegment_seconds = {segment_seconds}\n\n[health]\nenabled = {str(health).lower()}\n')
    for index in range(cameras):
        text += (f'\n[[camera]]\nid = "cam-{index + 1:02d}"\nroom = "T{101 + index // 2}"\n'
                 f'room_kind = "theory"\nsource = "{source}"\n')
    path = root / "edge.toml"
    path.write_text(text)
    return path


def bare_ffmpeg(config_path: Path, seconds: float) -> Cost:
    config = load_config(config_path)
    before = children_cpu()
    procs = []
    for cam in config.cameras:
        out = config.agent.recording_dir / cam.id
        out.mkdir(parents=True, exist_ok=True)
        cmd = build_command(cam, config.recording.segment_seconds, out, new_run_id())
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env={**os.environ, "TZ": "UTC"}))
    time.sleep(seconds)
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        proc.wait(30)
    return Cost(cpu=children_cpu() - before)


def agent(config_path: Path, seconds: float) -> Cost:
    before = children_cpu()
    proc = subprocess.Popen([str(BIN / "exam-edge"), "--config", str(config_path), "run", "--duration",
                             str(seconds), "--drain-seconds", "0",
                             # no collector here: every round's cameras are new, so they start at seq 1
                             "--new-chains"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    own = None
    while proc.poll() is None:
        own = process_cpu(proc.pid) or own
        time.sleep(0.5)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"exam-edge run exited {proc.returncode}: {err[-2000:]}")
    return Cost(cpu=children_cpu() - before, own=own)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=180.0, help="recording time of each run")
    parser.add_argument("--segment-seconds", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat bare/off/on this many times, interleaved; each keeps its least CPU (default 3)")
    args = parser.parse_args(argv)
    if mosquitto_binary() is None:
        raise SystemExit("bench.agent_cpu: error: mosquitto is not installed; run `make deps`")
    with tempfile.TemporaryDirectory(prefix="bench-agent-cpu-") as tmp:
        root = Path(tmp)
        source = root / "camera-1080p25.ts"
        make_source(source)
        broker = Mosquitto(workdir=root / "mosquitto", max_packet_size=1024 * 1024)
        broker.start()
        try:
            runs: dict[str, Cost] = {}
            every: dict[str, list[Cost]] = {"bare": [], "off": [], "on": []}
            for round_no in range(1, args.rounds + 1):
                for name, health in (("bare", False), ("off", False), ("on", True)):
                    config = write_config(root / f"{name}-{round_no}", broker.url, source, args.cameras,
                                          args.segment_seconds, health)
                    print(f"round {round_no}/{args.rounds}, {name}: {args.cameras} cameras for {args.seconds:.0f} s ...",
                          flush=True)
                    cost = bare_ffmpeg(config, args.seconds) if name == "bare" else agent(config, args.seconds)
                    print(f"  {cost.cpu:.2f} CPU-s" + (f" (agent process {cost.own:.2f})" if cost.own else ""),
                          flush=True)
                    every[name].append(cost)
                    if name not in runs or cost.cpu < runs[name].cpu:
                        runs[name] = cost
        finally:
            broker.stop()
    report(runs, every, args.cameras, args.seconds, args.segment_seconds)
    return 0


def report(runs: dict[str, Cost], every: dict[str, list[Cost]], cameras: int, seconds: float,
           segment_seconds: int) -> None:
    """Ratios with the absolute figures beside them: least CPU of each side, the agent's overhead per
    camera-hour, and bare ffmpeg's spread across rounds."""
    rounds = len(every["bare"])
    camera_hours = cameras * seconds / 3600
    bare = runs["bare"].cpu
    bare_rounds = [c.cpu for c in every["bare"]]
    print(f"\n{cameras} cameras, 1080p25 ~3 Mbit/s stream copy, {segment_seconds} s segments, "
          f"{seconds:.0f} s each run ({camera_hours:.2f} camera-hours), least of {rounds} round(s) for every side")
    spread = (f"spread {min(bare_rounds):.2f}-{max(bare_rounds):.2f}, slowest "
              f"{100 * (max(bare_rounds) / min(bare_rounds) - 1):.0f} % above least" if rounds > 1 and bare
              else "one round: no spread, rerun with --rounds 3")
    print(f"bare ffmpeg segmenting           {bare:7.2f} CPU-s   1.00   = {bare / camera_hours:.1f} CPU-s per "
          f"camera-hour; rounds {', '.join(f'{v:.2f}' for v in bare_rounds)} ({spread})")
    for name, target in (("off", TARGET_OFF), ("on", TARGET_ON)):
        cost = runs[name]
        ratio = cost.cpu / bare if bare else float("inf")
        own = f" (agent process {cost.own:.2f})" if cost.own is not None else ""
        verdict = "meets" if ratio <= target else "MISSES"
        print(f"agent + ffmpeg, analysis {name:<4}   {cost.cpu:7.2f} CPU-s   {ratio:5.2f}  {verdict} target "
              f"<= {target}{own}; rounds {', '.join(f'{c.cpu:.2f}' for c in every[name])}")
        overhead = cost.cpu - bare
        per_round = ", ".join(f"{(a.cpu - b.cpu) / camera_hours:.1f}" for a, b in zip(every[name], every["bare"]))
        own_rate = (f"; agent process alone {cost.own / camera_hours:.1f} CPU-s per camera-hour"
                    if cost.own is not None else "")
        print(f"  agent overhead, analysis {name:<4} {overhead:7.2f} CPU-s = {overhead / camera_hours:.1f} CPU-s per "
              f"camera-hour (least agent - least bare; per round: {per_round}){own_rate}")


if __name__ == "__main__":
    sys.exit(main())
