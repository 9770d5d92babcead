"""`pd demo`: make the test model if needed, launch 1P1D, send requests, show what moved, stop.

Sends one chat and one completions request (non-streaming, temperature 0) through the proxy,
prints the answers, then asks ``GET {proxy}/pd/transfers/{x-pd-id}`` how many KV chunks and bytes
went from prefill to decode and how long decode took to load them. Exits non-zero if anything
failed (a request, or a transfer that did not load).

With ``--store local|hf3fs`` the deployment also has a persistent store (vLLM's own prefix cache
off, so that only pdkv's store can serve a repeat) and the demo sends a long context twice, cold
then warm: it prints both times to first token and how many prompt tokens the prefill instance
loaded from the store (vLLM's ``prompt_tokens_by_source`` counter), and fails if the warm
request loaded nothing or answered differently.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from common.config import load, merge
from launch.bench.ttft import ttft
from launch.model import make_model
from launch.procs import check_model, check_ports, served_name
from launch.scratch_store import ScratchStore
from launch.supervise import ChildDied, Deployment
from pd.config import DeploymentConfig

DEFAULT_MODEL = Path("models/tiny-llama")
CONTEXT = ("A long shared context, such as a system prompt, a document for RAG or the history of a "
           "chat, is prefilled once, written to the store, and loaded the next time it comes. ")
PROMPT = ("The prefill instance computes this prompt's KV cache and the decode instance loads it "
          "through the shared-memory transport instead of computing it again. ") * 12
MAX_TOKENS = 24


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd demo``."""
    p.add_argument("--model", help=f"HF model directory (default: {DEFAULT_MODEL}, made if absent)")
    p.add_argument("--port", type=int, default=8000, help="proxy port (default 8000)")
    p.add_argument("--keep", action="store_true", help="leave the deployment running (Ctrl-C stops it)")
    p.add_argument("--store", choices=("none", "local", "hf3fs"), default="none",
                   help="add a persistent store and show a cold and a warm request (default none)")
    p.add_argument("--store-path", help="the store's directory (default: a fresh temp dir, removed)")


def _post(url: str, body: dict) -> tuple[dict, str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read()), r.headers.get("x-pd-id", "")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} answered {e.code}: {e.read().decode(errors='replace')[:500]}") from None


def _transfer(proxy: str, pd_id: str, timeout_s: float = 10.0) -> dict:
    """The coordinator's record of ``pd_id`` once decode reported DONE ({} if none came)."""
    rec: dict = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{proxy}/pd/transfers/{pd_id}", timeout=5) as r:
                rec = json.loads(r.read())
            if rec.get("done"):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    return rec


def _show(kind: str, answer: str, pd_id: str, rec: dict) -> bool:
    print(f"\n[{kind}] pd_id {pd_id or '(none)'}\n  answer: {answer!r}")
    if not rec:
        print("  KV transfer: no record from the coordinator")
        return False
    if not rec.get("done"):
        print(f"  KV transfer: not finished ({rec})")
        return False
    state = "loaded by decode" if rec.get("ok") else f"FAILED ({rec.get('error')}); decode recomputed"
    print(f"  KV transfer: {rec.get('n_tokens', 0)} prompt tokens, {rec.get('n_chunks', 0)} chunks, "
          f"{rec.get('n_bytes', 0) / 1e6:.2f} MB; load {rec.get('load_ms', 0.0):.1f} ms "
          f"(waited {rec.get('wait_ms', 0.0):.1f} ms for prefill) - {state}")
    return bool(rec.get("ok"))


def _model(arg: str | None) -> Path:
    if arg:
        return check_model(arg)
    if not (DEFAULT_MODEL / "config.json").is_file():
        print(f"pdkv demo: making the test model in {DEFAULT_MODEL}", flush=True)
        make_model(DEFAULT_MODEL)
    return check_model(str(DEFAULT_MODEL))


def _requests(url: str, name: str) -> bool:
    ok = True
    body, pd_id = _post(f"{url}/v1/chat/completions", {
        "model": name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
        "temperature": 0})
    ok &= _show("chat", body["choices"][0]["message"]["content"], pd_id, _transfer(url, pd_id))
    body, pd_id = _post(f"{url}/v1/completions", {
        "model": name, "prompt": PROMPT * 2, "max_tokens": MAX_TOKENS, "temperature": 0})
    ok &= _show("completions", body["choices"][0]["text"], pd_id, _transfer(url, pd_id))
    return ok


def _metric(url: str, name: str, label: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith(name) and label in line)


def _cold_warm(url: str, name: str, prefill_url: str) -> bool:
    """A long context cold, then again: the warm one must be loaded from the store."""
    metric, src = "vllm:prompt_tokens_by_source_total", 'source="external_kv_transfer"'
    context = CONTEXT * 30  # about 1100 tokens: 4 whole chunks can be stored
    before = _metric(prefill_url, metric, src)
    cold, cold_text = ttft(url, name, context, MAX_TOKENS)
    time.sleep(0.5)  # the write-through reaches the store
    mid = _metric(prefill_url, metric, src)
    warm, warm_text = ttft(url, name, context, MAX_TOKENS)
    loaded = _metric(prefill_url, metric, src) - mid
    print(f"\n[cold] time to first token {cold * 1e3:.0f} ms; prompt tokens loaded from the store: "
          f"{mid - before:.0f}")
    print(f"[warm] time to first token {warm * 1e3:.0f} ms; prompt tokens loaded from the store: "
          f"{loaded:.0f} ({cold / warm:.1f}x faster)")
    same = warm_text == cold_text
    print(f"  same answer: {'yes' if same else 'NO'}: {warm_text!r}")
    return same and loaded > 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """``pd demo``: 0 if both requests were answered and their KV was loaded by decode."""
    model = _model(args.model)
    over: dict = {"model": str(model), "proxy": {"port": args.port}}
    store = None
    if args.store != "none":
        store = ScratchStore(args.store, args.store_path)
        over["connector"] = {"store": store.config()}
        over["vllm"] = {"extra_args": ["--no-enable-prefix-caching"]}
    dep = merge(load(DeploymentConfig, {}), over)
    deployment = Deployment(dep)
    try:
        check_ports(dep)  # a busy port is a user error (exit 2), before anything starts
    except BaseException:
        if store is not None:
            store.cleanup()
        raise
    signal.signal(signal.SIGTERM, _interrupt)
    ok = False
    try:
        deployment.start(progress=lambda line: print(line, flush=True))
        url = deployment.proxy_url
        print(f"pdkv ready: proxy at {url} (run dir: {deployment.run_dir})", flush=True)
        ok = _requests(url, served_name(dep))
        if store is not None:
            print(f"\nstore/{store.backend} at {store.path}, vLLM's prefix cache off"
                  + (f" ({store.note})" if store.note else ""))
            ok &= _cold_warm(url, served_name(dep), f"http://127.0.0.1:{dep.prefill.port_base}")
        if args.keep:
            print(f"\nleaving it running at {url}; Ctrl-C stops it", flush=True)
            deployment.watch()
    except ChildDied as e:
        print(f"pdkv demo: {e}", file=sys.stderr)
        ok = False
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        print(f"pdkv demo: request failed: {e}", file=sys.stderr)
        ok = False
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        deployment.stop()
        if store is not None:
            store.cleanup()
    print("\npdkv demo:", "ok" if ok else "FAILED")
    return 0 if ok else 1
