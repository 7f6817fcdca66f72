"""docs/install-collector.md, run as written: every ```sh block after a `<!-- step: NAME -->` marker is run by
this test, in order, as root, with substitutions that keep it private; the blocks marked `not run: REASON`
are the ones it cannot run, and the test does instead what the reason says.

Substitutions (`Install.subs`): the paths /etc/exam-collector, /etc/exam-edge, /etc/mosquitto, /var/lib/...,
/var/log/mosquitto, /srv/..., /root/... and /usr/lib/sysusers.d live under one temporary directory (mode
0755, so the service users can reach their files); /opt/exam-footage is this checkout and its .venv; the
role `exam_collector` and database `exam_footage` get a unique name (dropped in `finally`); port 8883 is a
free port; collector.example.cn is localhost (the server certificate is made for that name, so TLS
hostname checks are real); the doc's RTSP cameras are lavfi testsrc2 cameras; `systemctl reload mosquitto`
is `kill -HUP` of the private broker. Besides: `[http] listen` gets a free port, the venue config records
10-s segments (the shortest allowed) instead of 60 s, and EXAM_COLLECTOR_CONFIG points the commands that
use the default config path at the temporary one.

Run for real: systemd-sysusers (creates the system users `exam-collector` and `exam-edge` on this host, as
the doc does), PostgreSQL role and database, openssl CA and certificate, the deploy/ Mosquitto config and
ACL run by /usr/sbin/mosquitto, which drops to user `mosquitto` and reads its files through the modes the doc
sets, mosquitto_passwd, `exam-collector init`/`db upgrade`/`users add`, deploy/add-agent.sh, the venue's
`exam-edge init`/`probe`, the units' ExecStartPre/ExecStart run as their User= (setpriv, no capabilities) with
their Environment= and UMask=, a verified first upload, the retention script of exam-retention.service, the
backup (pg_dump, rsync, collector.key, the audit checkpoint copied with mosquitto_sub as `auditor`), and a
restore after the database and footage were lost.

Not exercised: apt-get install and git clone (this checkout's venv stands in); systemctl/journalctl (no
systemd as PID 1 here): the units pass `systemd-analyze verify` instead, and their sandboxing
(ProtectSystem=, SystemCallFilter= ...) is not applied; cron; a real NFS backup target; the database password
wherever the test server trusts 127.0.0.1 (this machine's does), since PostgreSQL then never asks for it.

This checkout's interpreter may live under a directory others cannot enter (/root, 0700, with pyenv): then
every step runs in a private mount namespace where only that interpreter's tree is visible under it, so the
service users can run it. Nothing else of the host changes apart from the two system users.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_URL, _unavailable
from tests.support.pipeline import read_journal, wait_until
from tests.support.services import free_port, lavfi_source, mosquitto_binary, wait_for_port

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "install-collector.md"
VENV = Path(sys.executable).parent.parent
STEP_RE = re.compile(r"<!-- step: (?P<name>[\w-]+)(?: \| not run: (?P<why>[^>]+?))? -->\n```sh\n(?P<body>.*?)\n```\n",
                     re.S)
CAMERAS = ("t101-front", "p201-front")
AGENT = "jl2201001-01-a"
PUBKEY_PLACEHOLDER = "<公钥>"


@dataclass(frozen=True)
class Step:
    name: str
    body: str
    not_run: str | None


def doc_steps() -> dict[str, Step]:
    text = DOC.read_text(encoding="utf-8")
    steps: dict[str, Step] = {}
    for match in STEP_RE.finditer(text):
        assert match["name"] not in steps, f"step {match['name']} appears twice in {DOC.name}"
        steps[match["name"]] = Step(match["name"], match["body"], match["why"])
    return steps


def test_every_command_block_of_the_doc_is_a_step():
    """No ```sh block escapes the test: each has a step marker, and each one not run says why."""
    text = DOC.read_text(encoding="utf-8")
    blocks = len(re.findall(r"^```sh$", text, flags=re.M))
    steps = doc_steps()
    assert blocks == len(steps) > 15, f"{blocks} sh blocks, {len(steps)} with a step marker"
    not_run = {name: step.not_run for name, step in steps.items() if step.not_run}
    assert all(reason.strip() for reason in not_run.values())
    # What is not run is systemd's, the package installation or the code update: nothing of the product.
    for name in not_run:
        for line in steps[name].body.splitlines():
            assert line.split()[0] in {"systemctl", "journalctl", "apt-get", "git", "cd", "ln", "cp"}, (name, line)


# ---------------------------------------------------------------------------- the install, step by step

def _ids(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def _owner_mode(path: Path) -> tuple[str, str, int]:
    import grp

    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)


def _namespace_prefix() -> str:
    """Shell lines that make this interpreter reachable by other users when a 0700 directory (pyenv under /root)
    holds it: in a private mount namespace, a tmpfs covers that directory and only the interpreter's tree is
    bound back. Empty when the interpreter is reachable anyway (a real install in /opt)."""
    real = Path(os.path.realpath(sys.executable))
    for parent in reversed(real.parents):
        if parent != Path("/") and not parent.stat().st_mode & stat.S_IXOTH:
            child = parent / real.relative_to(parent).parts[0]
            stash = Path(tempfile.mkdtemp(prefix="interp-"))
            return (f"mount --make-rprivate / && mount --bind {child} {stash} && "
                    f"mount -t tmpfs -o mode=0755 tmpfs {parent} && mkdir -p {child} && "
                    f"mount --bind {stash} {child}\n")
    return ""


@dataclass
class Install:
    root: Path
    role: str
    db: str
    mqtt_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    prefix: str = ""
    steps: dict[str, Step] = field(default_factory=doc_steps)
    extra: dict[str, str] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def subs(self) -> dict[str, str]:
        r = self.root
        lavfi = lavfi_source(rate=10, size="320x240")
        return {
            "/opt/exam-footage/.venv": str(VENV), "/opt/exam-footage": str(REPO),
            "/etc/exam-collector": f"{r}/etc/exam-collector", "/etc/exam-edge": f"{r}/venue/etc/exam-edge",
            "/etc/mosquitto": f"{r}/etc/mosquitto", "/etc/systemd/system": f"{r}/etc/systemd/system",
            "/usr/lib/sysusers.d": f"{r}/usr/lib/sysusers.d", "/var/lib/exam-collector": f"{r}/var/lib/exam-collector",
            "/var/lib/exam-edge": f"{r}/venue/var/lib/exam-edge", "/var/lib/mosquitto": f"{r}/var/lib/mosquitto",
            "/var/log/mosquitto": f"{r}/var/log/mosquitto", "/srv/exam-footage": f"{r}/srv/exam-footage",
            "/srv/backup": f"{r}/srv/backup", "/root/": f"{r}/root/",
            "collector.example.cn": "localhost", "8883": str(self.mqtt_port),
            "exam_collector": self.role, "exam_footage": self.db,
            "rtsp://admin:password@192.168.1.64:554/Streaming/Channels/101": lavfi,
            "rtsp://admin:password@192.168.1.65:554/Streaming/Channels/101": lavfi,
            **self.extra,
        }

    def substitute(self, text: str) -> str:
        subs = self.subs
        pattern = re.compile("|".join(re.escape(key) for key in sorted(subs, key=len, reverse=True)))

        def replace(match: re.Match[str]) -> str:
            self.used.add(match.group(0))
            return subs[match.group(0)]

        return pattern.sub(replace, text)

    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}",
                "EXAM_COLLECTOR_CONFIG": f"{self.root}/etc/exam-collector/collector.toml"}

    def run(self, name: str, cwd: Path | None = None, stdin: str | None = None,
            expect: int = 0) -> subprocess.CompletedProcess[str]:
        step = self.steps[name]
        assert step.not_run is None, f"step {name} is marked not run"
        t0 = time.monotonic()
        script = self.prefix + "set -euo pipefail\n" + self.substitute(step.body) + "\n"
        result = subprocess.run(["unshare", "-m", "bash", "-c", script] if self.prefix else ["bash", "-c", script],
                                input=stdin, capture_output=True, text=True, env=self.env(),
                                cwd=cwd or self.root / "root", timeout=300)
        print(f"step {name}: {time.monotonic() - t0:.1f} s")
        assert result.returncode == expect, (f"step {name} exited {result.returncode}:\n{result.stdout}\n"
                                             f"{result.stderr}\n{self.tails()}")
        return result

    def start_unit(self, unit: str, unit_dir: Path | None = None) -> subprocess.Popen:
        """What systemd does for a Type=simple unit, without its sandbox: ExecStartPre then ExecStart, as User=
        and Group= (setpriv: no capabilities, the user's groups), with Environment= and UMask=."""
        values = unit_directives((unit_dir or self.root / "etc" / "systemd" / "system") / unit)
        user, group = values["User"][0], values["Group"][0]
        env = [self.substitute(value) for value in values.get("Environment", [])]
        umask = values.get("UMask", ["0022"])[0]
        as_user = (f"setpriv --reuid {user} --regid {group} --init-groups -- env HOME=/ {' '.join(env)} "
                   f"sh -c 'umask {umask}; exec \"$0\" \"$@\"'")
        for pre in values.get("ExecStartPre", []):
            subprocess.run(["unshare", "-m", "bash", "-c", f"{self.prefix}exec {as_user} {self.substitute(pre)}"]
                           if self.prefix else ["bash", "-c", f"exec {as_user} {self.substitute(pre)}"],
                           check=True, capture_output=True, text=True, env=self.env(), timeout=120)
        command = f"exec {as_user} {self.substitute(values['ExecStart'][0])}"
        log_path = self.root / f"{unit}.log"
        log = open(log_path, "ab")
        process = subprocess.Popen(["unshare", "-m", "bash", "-c", self.prefix + command] if self.prefix
                                   else ["bash", "-c", command], stdout=log, stderr=subprocess.STDOUT,
                                   env=self.env(), cwd="/")
        log.close()
        self.processes[unit] = process
        self.logs[unit] = log_path
        return process

    def stop(self, name: str, timeout: float = 90) -> int | None:
        process = self.processes.pop(name, None)
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def tails(self) -> str:
        out = []
        for name, path in self.logs.items():
            if path.exists():
                out.append(f"--- {name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(out)


def unit_directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _psql(sql: str) -> None:
    subprocess.run(["psql", _libpq_url(), "-v", "ON_ERROR_STOP=1", "--quiet", "-c", sql], check=True,
                   capture_output=True, text=True, timeout=60)


def _libpq_url() -> str:
    return PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def install() -> Iterator[Install]:
    if os.geteuid() != 0:
        _unavailable("root (the install creates system users and sets file owners)")
    for tool in ("openssl", "mosquitto_passwd", "mosquitto_sub", "psql", "pg_dump", "pg_restore", "rsync",
                 "systemd-sysusers", "setpriv", "runuser", "unshare", "ffmpeg"):
        if shutil.which(tool) is None:
            _unavailable(tool)
    if mosquitto_binary() is None:
        _unavailable("mosquitto")
    try:
        pwd.getpwnam("mosquitto")
        pwd.getpwnam("postgres")
    except KeyError:
        _unavailable("the mosquitto and postgresql packages' users")
    if subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-d", "postgres", "-c", "select 1"],
                      capture_output=True).returncode != 0:
        _unavailable("a local PostgreSQL reachable as `runuser -u postgres -- psql`")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        _unavailable("a private mount namespace (unshare -m), to let the service users run this checkout's interpreter")
    tag = secrets.token_hex(4)
    root = Path(tempfile.mkdtemp(prefix="install-collector-", dir="/tmp"))
    root.chmod(0o755)
    found = Install(root=root, role=f"exam_collector_t{tag}", db=f"exam_footage_t{tag}")
    found.prefix = _namespace_prefix()
    # What a Debian 12 system with the postgresql and mosquitto packages has.
    for sub in ("etc/systemd/system", "usr/lib/sysusers.d", "srv", "venue/etc", "venue/var/lib", "venue/work"):
        (root / sub).mkdir(parents=True)
    (root / "root").mkdir(mode=0o700)
    uid, gid = _ids("mosquitto")
    for sub in ("var/lib/mosquitto", "var/log/mosquitto"):
        (root / sub).mkdir(parents=True, mode=0o755)
        os.chown(root / sub, uid, gid)
    try:
        yield found
    finally:
        for name in list(found.processes):
            found.stop(name, timeout=30)
        subprocess.run(["psql", _libpq_url(), "-c", f'drop database if exists "{found.db}" with (force)'],
                       capture_output=True)
        subprocess.run(["psql", _libpq_url(), "-c", f'drop role if exists "{found.role}"'], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        if found.prefix:
            stash = re.search(r"mount --bind \S+ (\S+) &&", found.prefix)
            if stash:
                shutil.rmtree(stash.group(1), ignore_errors=True)


def _start_broker(inst: Install) -> None:
    """Debian's mosquitto.service runs `/usr/sbin/mosquitto -c /etc/mosquitto/mosquitto.conf` as root; mosquitto
    drops to user `mosquitto` itself (no `user root` here). The installed deploy/ config is adapted only in its
    paths and port, by the same substitutions as the steps."""
    config = inst.root / "etc" / "mosquitto" / "mosquitto.conf"
    text = config.read_text()
    assert text == (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    assert "\nuser " not in text
    adapted = inst.substitute(text).replace(f"listener {inst.mqtt_port}\n", f"listener {inst.mqtt_port} 127.0.0.1\n")
    assert f"listener {inst.mqtt_port} 127.0.0.1\n" in adapted and str(inst.root) in adapted
    config.write_text(adapted)
    inst.logs["mosquitto"] = inst.root / "var" / "log" / "mosquitto" / "mosquitto.log"
    inst.processes["mosquitto"] = subprocess.Popen([mosquitto_binary() or "/usr/sbin/mosquitto", "-c", str(config)],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port("127.0.0.1", inst.mqtt_port)


def _uid_of(process: subprocess.Popen) -> int:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def _stored_segments(inst: Install) -> dict[str, int]:
    rows = read_journal(inst.root / "venue" / "var" / "lib" / "exam-edge" / "journal.sqlite",
                        "select camera, count(*) from records where kind = 'segment' and state = 'stored' "
                        "group by camera")
    return dict(rows)


def _expect_owner_mode(path: Path, owner: str, group: str, mode: int) -> None:
    assert _owner_mode(path) == (owner, group, mode), f"{path}: {_owner_mode(path)}, doc says {owner}:{group} {mode:o}"


def test_install_collector_doc_step_by_step(install: Install, ffmpeg_available: None) -> None:
    inst = install
    r = inst.root
    started = time.monotonic()

    # 1. service users (systemd-sysusers on this host), 2. role and database, 3. CA, certificate, broker files.
    assert "exam-collector" in inst.run("users").stdout
    inst.run("database")
    inst.run("tls")
    inst.run("broker-config")
    _expect_owner_mode(r / "etc/mosquitto/exam", "root", "mosquitto", 0o750)
    for name in ("server.key", "passwd", "acl"):
        _expect_owner_mode(r / "etc/mosquitto/exam" / name, "root", "mosquitto", 0o640)
    _expect_owner_mode(r / "etc/exam-collector/mqtt.pass", "root", "exam-collector", 0o640)
    _expect_owner_mode(r / "etc/exam-collector/auditor.pass", "root", "root", 0o600)
    _start_broker(inst)
    assert _uid_of(inst.processes["mosquitto"]) == _ids("mosquitto")[0], "mosquitto kept root"

    # 4. collector config and key; the portal gets a free port (the test's only change to the config).
    inst.run("collector-config")
    config = r / "etc/exam-collector/collector.toml"
    text = config.read_text()
    assert 'storage_dir = "' + f'{r}/srv/exam-footage"' in text and 'username = "collector-1"' in text
    config.write_text(text.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{inst.http_port}"'))
    _expect_owner_mode(config, "root", "exam-collector", 0o640)
    _expect_owner_mode(r / "etc/exam-collector", "root", "exam-collector", 0o750)
    _expect_owner_mode(r / "var/lib/exam-collector", "exam-collector", "exam-collector", 0o750)
    _expect_owner_mode(r / "var/lib/exam-collector/collector.key", "exam-collector", "exam-collector", 0o600)
    _expect_owner_mode(r / "srv/exam-footage", "exam-collector", "exam-collector", 0o750)
    assert not (r / "root" / f"{inst.role}.dbpass").exists()

    # 5. units installed and checked, then run as systemd would run them.
    inst.run("units-install")
    _verify_units(inst)
    collector = inst.start_unit("exam-collector.service")
    wait_for_port("127.0.0.1", inst.http_port, timeout=60)
    assert _uid_of(collector) == _ids("exam-collector")[0]

    # 6. the first admin, who can log in to the portal.
    password = secrets.token_urlsafe(16)
    inst.run("admin", stdin=password + "\n")
    _login(inst, "admin", password)

    # 7. the first venue: venue init, add-agent.sh on the collector, the files carried over, cameras, start.
    venue_init = inst.run("venue-init")
    pubkey = venue_init.stdout.strip().splitlines()[-1]
    edge_config = r / "venue/etc/exam-edge/edge.toml"
    edge_text, count = re.subn(r"(?m)^segment_seconds = 60\b", "segment_seconds = 10", edge_config.read_text())
    assert count == 1
    edge_config.write_text(edge_text)
    inst.extra = {PUBKEY_PLACEHOLDER: pubkey,
                  "systemctl reload mosquitto": f"kill -HUP {inst.processes['mosquitto'].pid}"}
    inst.run("add-agent")
    work = r / "venue" / "work"
    for name in (f"{AGENT}.mqtt.pass", "ca.crt"):  # "over a trusted channel"
        shutil.copy(r / "root" / name, work / name)
    probe = inst.run("venue-config", cwd=work)
    assert all(camera in probe.stdout for camera in CAMERAS), probe.stdout
    _expect_owner_mode(r / "venue/etc/exam-edge/mqtt.pass", "root", "exam-edge", 0o640)
    _expect_owner_mode(r / "venue/var/lib/exam-edge", "exam-edge", "exam-edge", 0o750)
    # The venue machine's unit, as the not-run step venue-start would install it there.
    agent = inst.start_unit("exam-edge.service", REPO / "deploy" / "systemd")
    wait_until(lambda: all(_stored_segments(inst).get(camera, 0) >= 1 for camera in CAMERAS), 120,
               what=f"a stored segment of each camera\n{inst.tails()}")
    assert _uid_of(agent) == _ids("exam-edge")[0]
    assert inst.stop("exam-edge.service") == 0, inst.tails()

    # The first upload, verified on both sides.
    status = inst.run("venue-status").stdout
    rows = {words[0]: words for words in map(str.split, status.splitlines()) if words and words[0] in CAMERAS}
    for camera in CAMERAS:
        # camera, state, last seq, last stored, pending, pending MB, rejected, health
        assert camera in rows and int(rows[camera][3]) >= 1 and rows[camera][4] == "0" and rows[camera][6] == "0", status
    verified = inst.run("verify").stdout
    assert "全部哈希与签名已验证" in verified, verified
    stored = [p for p in (r / "srv/exam-footage").rglob("*") if p.is_file() and "staging" not in p.parts]
    assert len(stored) >= len(CAMERAS)
    assert {pwd.getpwuid(p.stat().st_uid).pw_name for p in stored} == {"exam-collector"}

    # 8. the retention run: the plan, then exam-retention.service's script as its user.
    inst.run("retention-plan")
    _run_retention_unit(inst)

    # 9. backup. The collector publishes the newest checkpoint (retained) at start: restart it, as days of
    # running would have meanwhile.
    assert inst.stop("exam-collector.service") == 0, inst.tails()
    inst.start_unit("exam-collector.service")
    wait_for_port("127.0.0.1", inst.http_port, timeout=60)
    inst.run("backup")
    backup = r / "srv/backup/exam-footage"
    checkpoint = next(backup.glob("checkpoint-*.json"))
    assert json.loads(checkpoint.read_text())["kind"] == "exam-collector audit checkpoint"

    # 10. the database, the footage, the key and the config are lost; section 2 makes an empty database.
    assert inst.stop("exam-collector.service") == 0, inst.tails()
    _psql(f'drop database "{inst.db}" with (force)')
    subprocess.run(["runuser", "-u", "postgres", "--", "createdb", "--owner", inst.role, inst.db], check=True)
    shutil.rmtree(r / "srv/exam-footage")
    (r / "var/lib/exam-collector/collector.key").unlink()
    config.unlink()
    restored = inst.run("restore")
    assert "全部哈希与签名已验证" in restored.stdout and "audit log verified" in restored.stdout, restored.stdout
    _expect_owner_mode(config, "root", "exam-collector", 0o640)

    # 11. upgrade: the migration is idempotent; 12. the logs are where the doc says.
    inst.run("upgrade-db")
    logs = inst.run("logs").stdout
    assert "collector-1" in logs or AGENT in logs, logs
    assert _owner_mode(r / "var/log/mosquitto/mosquitto.log")[0] == "mosquitto"  # written after dropping root
    broker_log = (r / "var/log/mosquitto/mosquitto.log").read_text()
    assert f"as {AGENT}" in broker_log or f"u'{AGENT}'" in broker_log, broker_log[-2000:]

    # Every file of the doc's owners-and-modes table (section 0), after all the steps and the restore.
    _check_files_table(inst)

    unused = set(inst.subs) - inst.used
    assert not unused, f"substitutions the doc no longer needs (update the test): {sorted(unused)}"
    print(f"install-collector.md: all steps in {time.monotonic() - started:.0f} s")


def _check_files_table(inst: Install) -> None:
    lines = DOC.read_text(encoding="utf-8").split("## 0. ", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines if line.startswith("| `")]
    checked = 0
    for row in rows:
        names = re.findall(r"`([^`]+)`", row[0])
        if names[0].startswith("/opt/"):  # the checkout itself, not made by the doc
            continue
        owner, group = row[1].split(":")
        paths = [names[0]] + [str(Path(names[0]).parent / name) for name in names[1:]]
        for path in paths:
            _expect_owner_mode(Path(inst.substitute(path)), owner, group, int(row[2], 8))
            checked += 1
    assert checked >= 15, rows


def _verify_units(inst: Install) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        _unavailable("systemd-analyze")
    units = sorted((inst.root / "etc/systemd/system").iterdir())
    assert {unit.name for unit in units} == {"exam-collector.service", "exam-retention.service",
                                             "exam-retention.timer"}
    checked = inst.root / "verify"
    checked.mkdir()
    for unit in units:
        (checked / unit.name).write_text(inst.substitute(unit.read_text()))
    result = subprocess.run([tool, "verify", *sorted(str(p) for p in checked.iterdir())], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def _login(inst: Install, username: str, password: str) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{inst.http_port}/api/login", method="POST",
                                     data=json.dumps({"username": username, "password": password}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        assert json.loads(response.read()).get("token")


def _run_retention_unit(inst: Install) -> None:
    """exam-retention.service is Type=oneshot: its ExecStart as User= with Environment=, to the end."""
    unit = inst.root / "etc/systemd/system/exam-retention.service"
    values = unit_directives(unit)
    env = " ".join(inst.substitute(value) for value in values["Environment"])
    command = (f"exec setpriv --reuid {values['User'][0]} --regid {values['Group'][0]} --init-groups -- "
               f"env HOME=/ {env} {inst.substitute(values['ExecStart'][0])}")
    result = subprocess.run(["unshare", "-m", "bash", "-c", inst.prefix + command] if inst.prefix
                            else ["bash", "-c", command], capture_output=True, text=True, env=inst.env(),
                            timeout=600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    reports = inst.root / "var/lib/exam-collector/reports"
    assert sorted(p.suffix for p in reports.iterdir()) == [".html", ".json"]
