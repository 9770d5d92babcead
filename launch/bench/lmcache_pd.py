"""Mode ``lmcache_pd`` of ``pd bench serve --device cuda`` (issue 19): LMCache's (0.5.3) disaggregated
prefill through vLLM's ``LMCacheConnectorV1``, beside pdkv P/D and NixlConnector.

Two vLLM instances (1P1D only, like ``nixl``): the prefill one ``kv_producer`` with LMCache
``enable_pd``/``pd_role: sender``, the decode one ``kv_consumer`` with ``pd_role: receiver``; KV
goes GPU to GPU over LMCache's NIXL transfer channel (``transfer_channel: nixl``, UCX, the carried
nixl + nixl_cu13), into a ``pd_buffer_size`` buffer in the decode GPU's memory, from which the
decode instance's connector loads it as an external hit. Each instance reads its LMCache YAML
(``LMCACHE_CONFIG_FILE``) from ``conf_dir`` (``write_configs`` writes both before the start).

The proxy's part is done here by the client, as LMCache's disaggregated proxy sends it: the prompt
goes to the prefill instance with ``max_tokens`` 1 and ``kv_transfer_params`` ``{"ret_first_tok":
true, "disagg_spec": {req_id, receiver_host, receiver_init_port, receiver_alloc_port}}``; the
prefill's LMCache sends the KV to the receiver's ports and, once the last chunk is written,
pushes a ``ProxyNotif(req_id)`` (msgpack, ZMQ PUSH) to ``pd_proxy_host:pd_proxy_port``, where
``Notifications`` listens (ZMQ PULL); then the request goes to the decode instance, whose stream
is the answer. TTFT counts from the prefill request's send to the decode's first token (as for
``nixl``). LMCache's own proxy differs after that: it streams the prefill's token (``ret_first_tok``)
first and sends the decode the prompt plus that token with ``max_tokens`` - 1.

On vLLM 0.26 the answers of this mode are wrong from token 1 (LMCache issue 4463: its in-process
connector mislays K and V in vLLM 0.26's packed KV layout; docs/bench_gpu.md): its timings are
transfer costs, not correct serving.
"""
from __future__ import annotations

import itertools
import json
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import msgspec
import yaml
import zmq

from launch.bench.serve_load import Request, Result, completion_body, stream_into

MODE = "lmcache_pd"
HOST = "127.0.0.1"
# The receiver's NIXL init and allocation side channels, and where the sender notifies the proxy.
INIT_PORT, ALLOC_PORT, PROXY_PORT = 7300, 7301, 7302
NOTIFY_TIMEOUT_S = 120.0


def conf_dir(port: int) -> Path:
    """Where the two LMCache YAML files of a run on proxy port ``port`` go."""
    return Path(tempfile.gettempdir()) / f"pdkv-lmcache-pd-{port}"


def configs(buffer_gb: float, chunk_size: int = 256) -> dict[str, dict]:
    """The LMCache YAML of the prefill (sender) and decode (receiver) instance."""
    common = {"chunk_size": chunk_size, "local_cpu": False, "max_local_cpu_size": 0, "max_local_disk_size": 0,
              "enable_pd": True, "transfer_channel": "nixl", "nixl_backends": ["UCX"],
              "pd_buffer_size": int(buffer_gb * (1 << 30)), "pd_buffer_device": "cuda",
              "save_unfull_chunk": True, "internal_api_server_enabled": False}
    return {"prefill": {**common, "pd_role": "sender", "pd_proxy_host": HOST, "pd_proxy_port": PROXY_PORT},
            "decode": {**common, "pd_role": "receiver", "pd_peer_host": HOST, "pd_peer_init_port": [INIT_PORT],
                       "pd_peer_alloc_port": [ALLOC_PORT]}}


def write_configs(directory: Path, buffer_gb: float) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for group, cfg in configs(buffer_gb).items():
        out[group] = directory / f"lmcache-{group}.yaml"
        out[group].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def overrides(directory: Path) -> dict:
    """The prefill and decode groups' ``extra_args`` and ``env`` (deployment mode colocated, 1 + 1)."""
    out = {}
    for group, role, rpc in (("prefill", "kv_producer", "producer1"), ("decode", "kv_consumer", "consumer1")):
        kv = {"kv_connector": "LMCacheConnectorV1", "kv_role": role,
              "kv_connector_extra_config": {"discard_partial_chunks": False, "lmcache_rpc_port": rpc}}
        out[group] = {"extra_args": ["--kv-transfer-config", json.dumps(kv)],
                      "env": [f"LMCACHE_CONFIG_FILE={directory / f'lmcache-{group}.yaml'}",
                              "LMCACHE_TRACK_USAGE=false", "PYTHONHASHSEED=0"]}
    return out


class Notifications:
    """The proxy's side of LMCache's ``ProxyNotif``: a ZMQ PULL socket on ``HOST:port`` and a thread
    that marks each notified ``req_id``; ``wait(req_id)`` blocks until it has been (or times out)."""

    def __init__(self, port: int = PROXY_PORT):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.bind(f"tcp://{HOST}:{port}")
        self._cond = threading.Condition()
        self._done: set[str] = set()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="lmcache-proxy-notif", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while self._running:
            if not self._sock.poll(200):
                continue
            msg = msgspec.msgpack.decode(self._sock.recv())
            req_id = msg.get("req_id") if isinstance(msg, dict) else None
            if req_id:
                with self._cond:
                    self._done.add(req_id)
                    self._cond.notify_all()

    def wait(self, req_id: str, timeout_s: float = NOTIFY_TIMEOUT_S) -> bool:
        with self._cond:
            ok = self._cond.wait_for(lambda: req_id in self._done, timeout_s)
            self._done.discard(req_id)
            return ok

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2)
        self._sock.close(linger=0)
        self._ctx.term()


def prefill_params(req_id: str) -> dict:
    return {"ret_first_tok": True, "disagg_spec": {"req_id": req_id, "receiver_host": HOST,
                                                   "receiver_init_port": [INIT_PORT],
                                                   "receiver_alloc_port": [ALLOC_PORT]}}


def send_fn(prefill_urls: list[str], decode_urls: list[str], notes: Notifications):
    """A ``send(url, model, req, res)`` for ``run_load``: prefill with the disagg spec, wait for
    LMCache's notification that the KV is at the receiver, then stream from the decode instance."""
    turns = itertools.count()

    def send(_url: str, model: str, req: Request, res: Result) -> None:
        res.sent = time.perf_counter()
        k = next(turns)
        prefill_url, decode_url = prefill_urls[k % len(prefill_urls)], decode_urls[k % len(decode_urls)]
        req_id = uuid.uuid4().hex
        try:
            body = completion_body(model, req)
            first = dict(body, stream=False, max_tokens=1, kv_transfer_params=prefill_params(req_id))
            first.pop("stream_options", None)
            r = urllib.request.Request(f"{prefill_url}/v1/completions", json.dumps(first).encode(),
                                       {"Content-Type": "application/json"})
            with urllib.request.urlopen(r, timeout=600) as resp:
                resp.read()
            notified = notes.wait(req_id)
            stream_into(decode_url, body, res)
            if not notified:
                res.error = f"no LMCache transfer notification in {NOTIFY_TIMEOUT_S:.0f} s (decode may have recomputed)"
        except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
            res.error = f"{type(e).__name__}: {e}"

    return send
