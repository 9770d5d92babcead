"""What `pd bench soak` samples: processes, the shm pool, the store, the proxy's and vLLM's metrics.

Everything is read from outside the deployment, as an operator would: ``/proc`` for each process
(resident memory, open file descriptors, threads), the pool directory for the shm transport's live
values (one index link per value, its length in the link's target) and arenas, the store paths'
files, the proxy's ``/metrics`` (its request counters and the coordinator's counters and gauges)
and each vLLM instance's ``/metrics`` (KV cache usage, requests running).
"""
from __future__ import annotations

import os
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from transport.shm_index import ARENA_PREFIX, parse_target

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and parentheses
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    """Every process below ``pid`` (not ``pid`` itself), parents before children."""
    kids = _children_map() if kids is None else kids
    out, todo = [], list(kids.get(pid, ()))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


@dataclass
class ProcSample:
    rss: int  # bytes resident
    fds: int  # open file descriptors
    threads: int


def proc_sample(pid: int) -> ProcSample | None:
    """Resident bytes, open fds and threads of ``pid``; None if it is gone (or not ours to read)."""
    try:
        rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        threads = int(re.search(r"^Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, AttributeError, ValueError, IndexError):
        return None
    return ProcSample(rss_pages * PAGE, fds, threads)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def label_of(argv: list[str], names_by_port: dict[int, str]) -> str:
    """A deployment child's name from its command line: the launcher's name for its ``--port``
    (``prefill-0``, ``proxy``, ...), else its kind and port."""
    port = None
    if "--port" in argv[:-1]:
        value = argv[argv.index("--port") + 1]
        port = int(value) if value.isdigit() else None
    if port in names_by_port:
        return names_by_port[port]
    kind = next((w for w in ("proxy", "coordinator") if w in argv), "vllm" if any("vllm" in a for a in argv) else "")
    if not kind:
        kind = Path(argv[0]).name if argv and argv[0] else "process"
    return f"{kind}:{port}" if port else kind


def parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def listener_pid(port: int) -> int | None:
    """The process (of ours) listening on TCP ``port`` (IPv4 or IPv6), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = list(os.scandir(f"/proc/{entry.name}/fd"))
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd.path) in inodes:
                    return int(entry.name)
            except OSError:
                continue
    return None


@dataclass
class Processes:
    """The processes of a deployment, by stable names.

    ``tops``: name -> pid of each top process (what the launcher started); ``root``: a process
    whose children are the tops (``pd launch``), named by ``label_of``; it is sampled too, as
    ``launcher``. Each top's own children (vLLM's engine core, ...) are ``<top>/<comm>``.
    """
    tops: dict[str, int] = field(default_factory=dict)
    root: int | None = None
    names_by_port: dict[int, str] = field(default_factory=dict)

    def pids(self) -> dict[str, int]:
        kids = _children_map()
        tops = dict(self.tops)
        named: dict[str, int] = {}
        if self.root is not None:
            named["launcher"] = self.root
            for pid in kids.get(self.root, ()):
                name = label_of(_cmdline(pid), self.names_by_port)
                tops[name if name not in tops else f"{name}#{pid}"] = pid
        for top, pid in tops.items():
            named[top] = pid
            seen: dict[str, int] = {}
            for child in sorted(descendants(pid, kids)):
                comm = _comm(child)
                seen[comm] = seen.get(comm, 0) + 1
                named[f"{top}/{comm}" + (f"#{seen[comm]}" if seen[comm] > 1 else "")] = child
        return named

    def sample(self) -> dict[str, ProcSample]:
        out = {}
        for name, pid in self.pids().items():
            s = proc_sample(pid)
            if s is not None:
                out[name] = s
        return out


def pool_usage(pool: str) -> dict[str, int]:
    """The shm pool ``pool``: live values (index links) and their bytes, arenas and their bytes."""
    out = {"values": 0, "value_bytes": 0, "arenas": 0, "arena_bytes": 0}
    try:
        entries = list(os.scandir(pool))
    except FileNotFoundError:
        return out
    for e in entries:
        try:
            if e.name.startswith(ARENA_PREFIX):
                out["arenas"] += 1
                out["arena_bytes"] += e.stat(follow_symlinks=False).st_blocks * 512
            elif e.is_symlink() and not e.name.startswith("."):
                out["values"] += 1
                out["value_bytes"] += parse_target(os.readlink(e.path))[2]
        except (OSError, ValueError):  # gone meanwhile, or not one of ours
            continue
    return out


def dir_usage(paths: list[str]) -> dict[str, int]:
    """Files and bytes (allocated) under ``paths``."""
    files = size = 0
    todo = [p.removeprefix("file://") for p in paths]
    while todo:
        try:
            entries = list(os.scandir(todo.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    files += 1
                    size += e.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return {"files": files, "bytes": size}


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """``url``'s Prometheus text as {series: value}; a series is ``name{label="v",...}`` with the
    labels sorted (``name`` alone without labels). {} if it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


def total(series: dict[str, float], name: str, **match: str) -> float:
    """The sum of ``name``'s series whose labels include ``match`` (a value ending in ``*`` is a
    prefix)."""
    n = 0.0
    for key, value in series.items():
        base, _, labels = key.partition("{")
        if base != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if all(found.get(k, "").startswith(v[:-1]) if v.endswith("*") else found.get(k) == v
               for k, v in match.items()):
            n += value
    return n
