"""`pd bench soak`: mixed traffic through a P/D deployment's proxy for minutes; do its resources stay flat?

It starts a deployment (``--config``, default 1P1D with a local store in a temporary directory,
as ``pd launch`` would) or drives a running one (``--url`` of its proxy, with ``--config`` its
YAML and ``--pid`` its ``pd launch`` process, found from the proxy's port when left out). Requests
carry the proxy's API key when the config names ``proxy.api_key_file``.

Traffic: requests arrive as a Poisson process of ``--rate`` per second (seeded) for
``--minutes``; each asks for one of ``--prompts`` fixed prompts (``--long-fraction`` of them
``--long-tokens`` long, the rest ``--short-tokens``), ``--max-tokens`` tokens, greedy; a
``--stream-fraction`` of them stream, and ``--abort-fraction`` of the streamed ones are closed by
the client after 0-2 tokens. Every complete answer of a prompt must equal its first one (greedy
decoding: another answer means another request's KV, or torn KV, was used). A
``--fresh-fraction`` of the requests carry a prompt never sent before instead: new chunks for
the transport and the store (which fills to its budget and evicts over a long soak).

Every ``--interval`` seconds it samples (``launch.bench.soak_probe``): resident memory, open file
descriptors and threads of every process of the deployment (the launcher, proxy, coordinator,
each vLLM instance and its engine processes), the shm pool's live values and bytes, the store's
files and bytes, the coordinator's held READYs and parked WAITs and its error counters, the
proxy's answers by status, vLLM's KV cache usage; and prints a line. At the end: each process
over time, the verdict on every series (``launch.bench.soak_verdict``), and what was left once the
traffic stopped (after up to ``--drain-s``: no held READY, no parked WAIT, no value in the pool,
KV cache usage 0). Exit 0 when every series stayed flat, no request failed (other than those
the client aborted), no answer differed and nothing was left; else 1.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass

from common.config import load, merge
from launch.bench import soak_probe as probe
from launch.bench.common import VOCAB
from launch.bench.soak_report import leftovers, line, report
from launch.procs import check_model, plan, served_name
from launch.supervise import Deployment
from pd.config import DeploymentConfig, load_yaml
from pd.coordinator.curve import read_token
from transport.shm_index import pool_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=10.0, help="how long traffic runs (default 10)")
    p.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second (Poisson; default 1)")
    p.add_argument("--url", help="drive the running deployment whose proxy is here (default: start one)")
    p.add_argument("--config", help="deployment YAML: the one to start, or (--url) the running one's")
    p.add_argument("--pid", type=int, help="--url: its `pd launch` process (default: the parent of "
                   "the process listening on the proxy's port)")
    p.add_argument("--model", default="models/tiny-llama", help="without --config (default models/tiny-llama)")
    p.add_argument("--port", type=int, default=8000, help="without --config: the proxy's port (default 8000)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--prompts", type=int, default=24, help="distinct prompts (default 24)")
    p.add_argument("--long-fraction", type=float, default=0.25, help="share of long prompts (default 0.25)")
    p.add_argument("--long-tokens", type=int, default=1200, help="long prompt length (default 1200)")
    p.add_argument("--short-tokens", type=int, default=96, help="short prompt length (default 96)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per answer (default 24)")
    p.add_argument("--fresh-fraction", type=float, default=0.1,
                   help="share of requests with a never-seen prompt (default 0.1)")
    p.add_argument("--store-gb", type=float, default=0.5,
                   help="without --config: the local store's budget in GB (default 0.5)")
    p.add_argument("--stream-fraction", type=float, default=0.5, help="share streamed (default 0.5)")
    p.add_argument("--abort-fraction", type=float, default=0.2,
                   help="share of the streamed requests the client closes early (default 0.2)")
    p.add_argument("--request-timeout", type=float, default=180.0, help="client timeout per request (default 180)")
    p.add_argument("--drain-s", type=float, default=60.0,
                   help="after the traffic, wait this long at most for nothing to be left (default 60)")
    p.add_argument("--out", help="write every sample here (JSON lines)")
    p.add_argument("--seed", type=int, default=0)


@dataclass(frozen=True)
class Ask:
    prompt: int  # index into the prompts; -1: a fresh prompt made from ``fresh`` (a seed)
    stream: bool
    abort_after: int  # -1: read the whole answer; n >= 0: close after n tokens
    fresh: int = 0


def make_prompts(n: int, long_fraction: float, long_tokens: int, short_tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    n_long = round(n * long_fraction)
    return [[rng.randrange(*VOCAB) for _ in range(long_tokens if i < n_long else short_tokens)] for i in range(n)]


def check_args(args) -> None:
    """ValueError naming the option that is out of range."""
    for name, lo in (("minutes", 0), ("rate", 0), ("interval", 0), ("request_timeout", 0)):
        if not getattr(args, name) > lo:
            raise ValueError(f"--{name.replace('_', '-')} must be > {lo}, got {getattr(args, name)}")
    for name in ("prompts", "long_tokens", "short_tokens", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("long_fraction", "stream_fraction", "abort_fraction", "fresh_fraction"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not args.store_gb > 0:
        raise ValueError(f"--store-gb must be > 0, got {args.store_gb}")
    if args.drain_s < 0:
        raise ValueError(f"--drain-s must be >= 0, got {args.drain_s}")
    if args.pid is not None and not args.url:
        raise ValueError("--pid goes with --url (the running deployment's `pd launch` process)")


MAX_DIFFERING = 5  # differing answers kept whole for the report (their pd ids find them in the proxy's log)


class Traffic:
    """Sends the asks (one thread each) and keeps the outcomes."""

    def __init__(self, url: str, model: str, prompts: list[list[int]], max_tokens: int, timeout_s: float,
                 fresh_lengths: tuple[int, ...] = (96,), api_key: str | None = None):
        self.url, self.model, self.prompts, self.max_tokens, self.timeout_s = url, model, prompts, max_tokens, timeout_s
        self.headers = {"Content-Type": "application/json"}
        if api_key:  # the proxy's proxy.api_key_file
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.fresh_lengths = fresh_lengths  # a fresh prompt's length is one of these (seeded)
        self.counts: Counter = Counter()  # sent, ok, aborted, failed, differ
        self.errors: Counter = Counter()  # why failed
        self.answers: dict[int, tuple[str, str]] = {}  # prompt -> its first complete answer (text, pd id)
        self.differing: list[dict] = []  # the first few answers that differed, for the report
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def send(self, ask: Ask) -> None:
        with self._lock:
            self.counts["sent"] += 1
        th = threading.Thread(target=self._one, args=(ask,), daemon=True)
        th.start()
        self.threads = [t for t in self.threads if t.is_alive()] + [th]

    def in_flight(self) -> int:
        return sum(t.is_alive() for t in self.threads)

    def _one(self, ask: Ask) -> None:
        body = {"model": self.model, "prompt": self.prompt_of(ask), "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": ask.stream}
        req = urllib.request.Request(f"{self.url}/v1/completions", json.dumps(body).encode(), self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                text = self._read(resp, ask)
                pd_id = resp.headers.get("x-pd-id", "")
        except urllib.error.HTTPError as e:
            return self._outcome("failed", why=f"HTTP {e.code}")
        except Exception as e:  # noqa: BLE001 - a failed request is an outcome
            return self._outcome("failed", why=type(e).__name__)
        if text is None:
            return self._outcome("aborted")
        if not text:
            return self._outcome("failed", why="empty answer")
        if ask.prompt < 0:  # a fresh prompt: nothing to compare with
            return self._outcome("ok")
        with self._lock:
            first, first_id = self.answers.setdefault(ask.prompt, (text, pd_id))
            if first != text and len(self.differing) < MAX_DIFFERING:
                self.differing.append({"prompt": ask.prompt, "stream": ask.stream, "first": first,
                                       "first_pd_id": first_id, "text": text, "pd_id": pd_id})
        self._outcome("ok" if first == text else "differ")

    def prompt_of(self, ask: Ask) -> list[int]:
        if ask.prompt >= 0:
            return self.prompts[ask.prompt]
        rng = random.Random(ask.fresh)
        return [rng.randrange(*VOCAB) for _ in range(rng.choice(self.fresh_lengths))]

    def _read(self, resp, ask: Ask) -> str | None:
        """The answer's text; None when this client closed it early (as asked)."""
        if not ask.stream:
            return json.loads(resp.read())["choices"][0]["text"]
        text, n = "", 0
        for event in resp:
            if n == ask.abort_after:
                return None  # the with-block closes the connection mid-stream
            if event.startswith(b"data: {"):
                piece = json.loads(event[6:])["choices"][0].get("text") or ""
                text += piece
                n += bool(piece)
        return None if ask.abort_after >= 0 else text

    def _outcome(self, kind: str, why: str = "") -> None:
        with self._lock:
            self.counts[kind] += 1
            if why:
                self.errors[why] += 1


def asks(rng: random.Random, n_prompts: int, stream_fraction: float, abort_fraction: float,
         fresh_fraction: float = 0.0):
    """An endless seeded stream of asks."""
    while True:
        stream = rng.random() < stream_fraction
        abort = stream and rng.random() < abort_fraction
        fresh = rng.random() < fresh_fraction
        yield Ask(-1 if fresh else rng.randrange(n_prompts), stream, rng.randrange(3) if abort else -1,
                  rng.getrandbits(63) if fresh else 0)


@dataclass
class Target:
    """What is sampled: the processes, the pool, the store, the proxy and the instances."""
    url: str
    model: str
    procs: probe.Processes
    pool: str | None = None
    store_paths: tuple[str, ...] = ()
    store_budget: float | None = None
    instances: dict[str, str] | None = None  # name -> base URL
    api_key: str | None = None  # what clients send the proxy (proxy.api_key_file)

    def sample(self, t: float, traffic: Traffic) -> dict:
        proxy = probe.scrape(f"{self.url}/metrics")
        counters = {k.removeprefix("pdkv_coordinator_"): v for k, v in proxy.items()
                    if k.startswith("pdkv_coordinator_")}
        statuses = {c: probe.total(proxy, "pdkv_proxy_requests_total", status=f"{c}*") for c in "2345"}
        kv = {}
        for name, base in (self.instances or {}).items():
            m = probe.scrape(f"{base}/metrics")
            if m:
                kv[name] = probe.total(m, "vllm:kv_cache_usage_perc")
        with traffic._lock:
            counts, errors = dict(traffic.counts), dict(traffic.errors)
        return {"t": round(t, 2), "requests": counts, "errors": errors, "in_flight": traffic.in_flight(),
                "procs": {n: [s.rss, s.fds, s.threads] for n, s in self.procs.sample().items()},
                "pool": probe.pool_usage(self.pool) if self.pool else {},
                "store": probe.dir_usage(list(self.store_paths)) if self.store_paths else {},
                "coordinator": counters,
                "proxy": {"2xx": statuses["2"], "4xx": statuses["4"], "5xx": statuses["5"],
                          "499": probe.total(proxy, "pdkv_proxy_requests_total", status="499"),
                          "upstream_errors": probe.total(proxy, "pdkv_proxy_upstream_errors_total")},
                "kv_usage": kv}


def soak(target: Target, args, progress=print) -> tuple[list[dict], dict, Traffic]:
    """Run the traffic for ``args.minutes``, sampling; then drain. (samples, drained sample, traffic)."""
    prompts = make_prompts(args.prompts, args.long_fraction, args.long_tokens, args.short_tokens, args.seed)
    lengths = tuple(len(p) for p in prompts)  # fresh prompts: long and short in the same shares
    traffic = Traffic(target.url, target.model, prompts, args.max_tokens, args.request_timeout, lengths,
                      target.api_key)
    rng = random.Random(args.seed + 1)
    stream = asks(rng, args.prompts, args.stream_fraction, args.abort_fraction, args.fresh_fraction)
    out = open(args.out, "w") if args.out else None  # noqa: SIM115 - closed below
    samples: list[dict] = []

    def record(s: dict, label: str = "") -> None:
        samples.append(s)
        progress(label + line(s))
        if out:
            out.write(json.dumps(s) + "\n")
            out.flush()

    try:
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_send, next_sample = t0, t0
        while True:
            now = time.monotonic()
            if now >= next_sample:
                record(target.sample(now - t0, traffic))
                next_sample += args.interval
            if now >= end:
                break
            if now >= next_send:
                traffic.send(next(stream))
                next_send += rng.expovariate(args.rate)
            time.sleep(max(0.0, min(next_send, next_sample, end) - time.monotonic()))
        for th in traffic.threads:  # the requests still in flight end (or time out)
            th.join(max(0.0, end + args.request_timeout - time.monotonic()))
        drain_end = time.monotonic() + args.drain_s
        while True:
            last = target.sample(time.monotonic() - t0, traffic)
            if not leftovers(last) or time.monotonic() >= drain_end:
                break
            time.sleep(1.0)
        record(last, "after the traffic: ")
    finally:
        if out:
            out.close()
    return samples, last, traffic


def _deployment(args, store_dir: str | None):
    if args.config:
        return load_yaml(args.config)
    over = {"model": args.model, "proxy": {"port": args.port},
            "connector": {"store": {"backend": "local", "paths": [store_dir], "size_gb": args.store_gb}}}
    return merge(load(DeploymentConfig, {}), over)


def target_for(dep, url: str, procs: probe.Processes) -> Target:
    """What to sample of ``dep`` (a DeploymentConfig), its proxy at ``url``."""
    specs = plan(dep)
    procs.names_by_port = {s.port: s.name for s in specs if s.port}
    t = dep.connector.transport
    store = dep.connector.store
    paths = tuple(store.paths) if store.backend == "local" else ()
    instances = {s.name: s.health_url.removesuffix("/health") for s in specs
                 if s.health_url and s.name not in ("proxy",)}
    key = None
    if dep.proxy.api_key_file:
        key = read_token(dep.proxy.api_key_file, "proxy.api_key_file")
    return Target(url, served_name(dep), procs, pool_dir(t) if dep.mode == "pd" and t.kind == "shm" else None,
                  paths, store.size_gb * 1e9 if paths else None, instances, key)


def run(args) -> int:
    check_args(args)
    if args.url:
        dep = load_yaml(args.config) if args.config else load(DeploymentConfig, {})
        pid = args.pid
        if pid is None:
            port = int(args.url.rstrip("/").rsplit(":", 1)[1])
            listener = probe.listener_pid(port)
            if listener is None:
                raise ValueError(f"--url {args.url}: no process of ours listens on port {port}; give --pid")
            pid = probe.parent_pid(listener)
        target = target_for(dep, args.url.rstrip("/"), probe.Processes(root=pid))
        samples, last, traffic = soak(target, args)
        return 0 if report(samples, last, traffic, target) else 1
    store_dir = None if args.config else tempfile.mkdtemp(prefix="pdkv-soak-store-")
    try:
        dep = _deployment(args, store_dir)
        check_model(dep.model)
        d = Deployment(dep)
        try:
            d.start(progress=print)
            procs = probe.Processes(tops={name: proc.pid for name, (_, proc) in d.procs.items()})
            target = target_for(dep, d.proxy_url, procs)
            samples, last, traffic = soak(target, args)
        finally:
            d.stop()
    finally:
        if store_dir:
            shutil.rmtree(store_dir, ignore_errors=True)
    return 0 if report(samples, last, traffic, target) else 1
