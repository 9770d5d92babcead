"""`pd demo`: make the test model if needed, launch 1P1D, send requests, show what moved, stop."""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

from launch.launcher import ChildDied, Deployment
from launch.procs import check_ports
from pd.config import DeploymentConfig, load, merge

DEFAULT_MODEL = Path("models/tiny-llama")
PROMPT = ("The prefill instance computes this prompt's KV cache and the decode instance loads it "
          "through the shared-memory transport instead of computing it again. ") * 12


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"HF model directory (default: make {DEFAULT_MODEL} if absent)")
    p.add_argument("--port", type=int, default=8000, help="proxy port")
    p.add_argument("--keep", action="store_true", help="leave the deployment running (Ctrl-C stops it)")


def _post(url: str, body: dict) -> tuple[dict, str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read()), r.headers.get("x-pd-id", "")


def _transfer(proxy: str, pd_id: str) -> dict:
    for _ in range(50):
        try:
            with urllib.request.urlopen(f"{proxy}/pd/transfers/{pd_id}", timeout=10) as r:
                rec = json.loads(r.read())
            if rec.get("done"):
                return rec
        except OSError:
            pass
        time.sleep(0.2)
    return {}


def _show(kind: str, answer: str, rec: dict) -> bool:
    print(f"\n[{kind}] answer: {answer!r}")
    if not rec:
        print("  KV transfer: no record from the coordinator")
        return False
    state = "loaded by decode" if rec["ok"] else f"FAILED ({rec['error']}), decode recomputed"
    print(f"  KV transfer: {rec['n_tokens']} prompt tokens, {rec['n_chunks']} chunks, "
          f"{rec['n_bytes'] / 1e6:.2f} MB, load {rec['load_ms']:.1f} ms - {state}")
    return bool(rec["ok"])


def run(args) -> int:
    model = Path(args.model) if args.model else DEFAULT_MODEL
    if not args.model and not (model / "config.json").is_file():
        from launch.model import make_model

        print(f"pdkv demo: making the test model in {model}")
        make_model(model)
    dep = merge(load(DeploymentConfig, {}), {"model": str(model.resolve()), "proxy": {"port": args.port}})
    check_ports(dep)
    deployment = Deployment(dep)
    ok = True
    try:
        deployment.start()
        url = deployment.proxy_url
        print(f"pdkv ready: proxy at {url} (run dir: {deployment.run_dir})")
        name = deployment.specs[-2].argv[deployment.specs[-2].argv.index("--served-model-name") + 1]
        body, pd_id = _post(f"{url}/v1/chat/completions", {
            "model": name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "temperature": 0})
        ok &= _show("chat", body["choices"][0]["message"]["content"], _transfer(url, pd_id))
        body, pd_id = _post(f"{url}/v1/completions", {"model": name, "prompt": PROMPT * 2, "max_tokens": 24,
                                                      "temperature": 0})
        ok &= _show("completions", body["choices"][0]["text"], _transfer(url, pd_id))
        if args.keep:
            print(f"\nleaving it running at {url}; Ctrl-C stops it")
            while True:
                deployment.check_children()
                time.sleep(0.5)
    except ChildDied as e:
        print(f"pdkv demo: {e}", file=sys.stderr)
        ok = False
    except KeyboardInterrupt:
        pass
    finally:
        deployment.stop()
    print("\npdkv demo:", "ok" if ok else "FAILED")
    return 0 if ok else 1
