"""`pd demo`: make the test model if needed, launch 1P1D, send requests, show what moved, stop.

Sends one chat and one completions request (non-streaming, temperature 0) through the proxy,
prints the answers, then asks ``GET {proxy}/pd/transfers/{x-pd-id}`` how many KV chunks and bytes
went from prefill to decode and how long decode took to load them. Exits non-zero if anything
failed (a request, or a transfer that did not load).
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

from launch.launcher import ChildDied, Deployment
from launch.procs import check_model, check_ports, served_name
from pd.config import DeploymentConfig, load, merge

DEFAULT_MODEL = Path("models/tiny-llama")
PROMPT = ("The prefill instance computes this prompt's KV cache and the decode instance loads it "
          "through the shared-memory transport instead of computing it again. ") * 12
MAX_TOKENS = 24


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd demo``."""
    p.add_argument("--model", help=f"HF model directory (default: {DEFAULT_MODEL}, made if absent)")
    p.add_argument("--port", type=int, default=8000, help="proxy port (default 8000)")
    p.add_argument("--keep", action="store_true", help="leave the deployment running (Ctrl-C stops it)")


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
        from launch.model import make_model

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


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """``pd demo``: 0 if both requests were answered and their KV was loaded by decode."""
    model = _model(args.model)
    dep = merge(load(DeploymentConfig, {}), {"model": str(model), "proxy": {"port": args.port}})
    deployment = Deployment(dep)
    check_ports(dep)  # a busy port is a user error (exit 2), before anything starts
    signal.signal(signal.SIGTERM, _interrupt)
    ok = False
    try:
        deployment.start(progress=lambda line: print(line, flush=True))
        url = deployment.proxy_url
        print(f"pdkv ready: proxy at {url} (run dir: {deployment.run_dir})", flush=True)
        ok = _requests(url, served_name(dep))
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
    print("\npdkv demo:", "ok" if ok else "FAILED")
    return 0 if ok else 1
