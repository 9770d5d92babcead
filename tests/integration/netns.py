"""Two hosts on one machine: the root network namespace is host a, a new namespace is host b.

A veth pair joins them (10.211.<n>.1 on a, 10.211.<n>.2 on b); b gets its own loopback. Each
host's processes see only their own interfaces, so every byte between a and b crosses the veth
pair as it would cross a wire. Needs root and ``ip netns``; ``available()`` says why not.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


def _ip(*args: str, ns: str | None = None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True)


def available() -> str:
    """'' when two hosts can be made here, else why not (the reason a test is skipped with)."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"pdkvprobe{os.getpid()}"
    r = _ip("netns", "add", probe)
    if r.returncode != 0:
        return f"ip netns add is refused here: {r.stderr.strip()}"
    _ip("netns", "del", probe)
    return ""


@dataclass
class TwoHosts:
    ns_b: str  # host b's namespace (host a is the root namespace)
    addr_a: str
    addr_b: str
    veth_a: str

    def exec_b(self, argv: list[str]) -> list[str]:
        """``argv`` run on host b."""
        return ["ip", "netns", "exec", self.ns_b, *argv]

    def close(self) -> None:
        _ip("link", "del", self.veth_a)  # deletes both ends
        _ip("netns", "del", self.ns_b)


def make(n: int = 0) -> TwoHosts:
    """Create host b and the link; raises RuntimeError with ip's message if a step fails."""
    tag = f"{os.getpid() % 100000}{n}"
    net = 100 + (os.getpid() + n) % 150
    h = TwoHosts(ns_b=f"pdkvb{tag}", addr_a=f"10.211.{net}.1", addr_b=f"10.211.{net}.2", veth_a=f"pdva{tag}")
    veth_b = f"pdvb{tag}"
    steps = [
        (None, ("netns", "add", h.ns_b)),
        (None, ("link", "add", h.veth_a, "type", "veth", "peer", "name", veth_b)),
        (None, ("link", "set", veth_b, "netns", h.ns_b)),
        (None, ("addr", "add", f"{h.addr_a}/24", "dev", h.veth_a)),
        (None, ("link", "set", h.veth_a, "up")),
        (h.ns_b, ("addr", "add", f"{h.addr_b}/24", "dev", veth_b)),
        (h.ns_b, ("link", "set", veth_b, "up")),
        (h.ns_b, ("link", "set", "lo", "up")),
    ]
    for ns, args in steps:
        r = _ip(*args, ns=ns)
        if r.returncode != 0:
            h.close()
            raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")
    ping = subprocess.run(["ip", "netns", "exec", h.ns_b, "ping", "-c", "1", "-W", "2", h.addr_a],
                          capture_output=True, text=True)
    if ping.returncode != 0 and shutil.which("ping"):
        h.close()
        raise RuntimeError(f"host b cannot reach host a at {h.addr_a}: {ping.stdout}{ping.stderr}")
    return h
