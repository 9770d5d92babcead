"""`pd scale prefill=N decode=M`: change the pool sizes of a running ``pd launch --ray``.

It asks the launcher through its named Ray actor (``launch.ray_launch.controls_name``) and prints
what the launcher reports until the change is done: new instances ready and in the proxy's
pools, removed ones drained (out of the pools, their requests finished) and stopped.
"""
from __future__ import annotations

import argparse
import time

from common.config import ConfigError, load
from launch.ray_launch import controls_name, import_ray
from launch.ray_plan import parse_scale
from pd.config import DeploymentConfig, load_yaml


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd scale``."""
    p.add_argument("sizes", nargs="+", metavar="POOL=N", help="prefill=N and/or decode=M")
    p.add_argument("--config", help="the deployment YAML pd launch --ray was given (its ray: section, proxy.port)")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="the Ray cluster (default ray.address, auto)")
    p.add_argument("--port", type=int, help="the deployment's proxy port (proxy.port), without --config")
    p.add_argument("--timeout-s", type=float, default=900.0, help="longest wait for the change (default 900)")


def run(args: argparse.Namespace) -> int:
    """Ask for the sizes, print the launcher's lines until done; 1 on a timeout."""
    ray = import_ray()
    targets = parse_scale(args.sizes)
    dep = load_yaml(args.config) if args.config else load(DeploymentConfig, {})
    if args.port is not None:
        dep.proxy.port = args.port
    ray.init(address=args.ray or dep.ray.address, namespace=dep.ray.namespace, log_to_driver=False,
             logging_level="ERROR")
    try:
        try:
            controls = ray.get_actor(controls_name(dep))
        except ValueError:
            raise ConfigError(f"no pd launch --ray deployment with proxy port {dep.proxy.port} in Ray namespace "
                              f"{dep.ray.namespace!r} (is it running, and are --config/--port its own?)") from None
        seen = len(ray.get(controls.progress.remote())[1])
        serial = ray.get(controls.request.remote(targets))
        print(f"pd scale: asked for {', '.join(f'{k}={v}' for k, v in targets.items())}", flush=True)
        return _follow(ray, controls, serial, seen, args.timeout_s)
    finally:
        ray.shutdown()


def _follow(ray, controls, serial: int, seen: int, timeout_s: float) -> int:
    """Print the launcher's lines from index ``seen`` until request ``serial`` is done."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, lines = ray.get(controls.progress.remote(seen))
        seen += len(lines)
        for line in lines:
            print(line, flush=True)
        if done >= serial:
            print("pd scale: done", flush=True)
            return 0
        time.sleep(0.5)
    print(f"pd scale: not done after {timeout_s:.0f}s (the launcher's output says what it waits for)", flush=True)
    return 1
