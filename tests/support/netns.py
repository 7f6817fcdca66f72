"""A real uplink for tests: a network namespace joined to the root namespace by a veth pair, on a private /30
chosen at random, whose namespace-side egress can be taken down or shaped with `tc ... tbf`. Needs root and
iproute2 (`ip`, `tc`); `unavailable()` says why not, for a skip."""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def unavailable() -> str | None:
    """Why a namespace with a veth pair cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "not root: creating a network namespace and a veth pair needs root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"iproute2 {' and '.join(missing)} not on PATH"
    probe = f"exam-probe-{uuid.uuid4().hex[:8]}"
    result = _run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` does not work here: {result.stderr.strip() or result.returncode}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A 10.x.y.z/30 that no address or route of the root namespace overlaps."""
    used = []
    for line in _run("ip", "-4", "-o", "addr", "show").stdout.splitlines() + \
            _run("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        for word in line.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{rng.randrange(64, 250)}.{rng.randrange(0, 256)}.{4 * rng.randrange(0, 64)}/30")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.x.y.z/30 found")


@dataclass
class Uplink:
    """The agent's side lives in namespace `ns` (interface `ns_if`, address `ns_ip`); the root namespace has
    `host_if` with `host_ip` (the broker listens there). `close()` removes the pair, any qdisc and the
    namespace; it is safe to call more than once and after a failed `open()`."""

    ns: str = field(default_factory=lambda: f"exam-uplink-{uuid.uuid4().hex[:8]}")
    host_if: str = ""
    ns_if: str = ""
    host_ip: str = ""
    ns_ip: str = ""
    shaped_kbit: int | None = None

    def open(self, rng: random.Random | None = None) -> Uplink:
        rng = rng or random.Random()
        tag = uuid.uuid4().hex[:6]
        self.host_if, self.ns_if = f"vul{tag}h", f"vul{tag}n"   # at most 15 characters
        net = _free_subnet(rng)
        host, peer = list(net.hosts())
        self.host_ip, self.ns_ip = str(host), str(peer)
        _run("ip", "netns", "add", self.ns)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _run("ip", "link", "set", self.ns_if, "netns", self.ns)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run("ip", "-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _run("ip", "-n", self.ns, "link", "set", "lo", "up")
        _run("ip", "-n", self.ns, "link", "set", self.ns_if, "up")
        return self

    def exec_prefix(self) -> list[str]:
        """Prepended to a command line, runs it in the namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns]

    def set_link(self, up: bool) -> None:
        """The namespace's end of the pair up or down: down, the namespace has no route to the broker at all
        (connecting fails at once, nothing is queued)."""
        _run("ip", "-n", self.ns, "link", "set", self.ns_if, "up" if up else "down")

    def shape(self, kbit: int, burst_bytes: int, latency_ms: int) -> None:
        """The namespace's egress (agent to broker) limited by a token bucket filter."""
        _run("tc", "-n", self.ns, "qdisc", "replace", "dev", self.ns_if, "root", "tbf", "rate", f"{kbit}kbit",
             "burst", str(burst_bytes), "latency", f"{latency_ms}ms")
        self.shaped_kbit = kbit

    def unshape(self) -> None:
        _run("tc", "-n", self.ns, "qdisc", "del", "dev", self.ns_if, "root", check=False)
        self.shaped_kbit = None

    def qdisc(self) -> str:
        return _run("tc", "-n", self.ns, "-s", "qdisc", "show", "dev", self.ns_if, check=False).stdout.strip()

    def close(self) -> list[str]:
        """Removes everything; returns what could not be removed (empty when all went)."""
        problems = []
        if self.ns_if:
            self.unshape()
        if self.host_if and _run("ip", "link", "show", self.host_if, check=False).returncode == 0:
            result = _run("ip", "link", "del", self.host_if, check=False)   # deletes both ends
            if result.returncode != 0:
                problems.append(f"veth {self.host_if}: {result.stderr.strip()}")
        if self.ns in _run("ip", "netns", "list", check=False).stdout.split():
            result = _run("ip", "netns", "del", self.ns, check=False)
            if result.returncode != 0:
                problems.append(f"netns {self.ns}: {result.stderr.strip()}")
        return problems
