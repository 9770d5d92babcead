"""``pd launch --ray [ADDRESS]``: a whole P/D deployment on an existing Ray cluster.

The control actor (on the node offering ``ray.control_resource``, default the head) runs the
coordinator, the transport servers and the proxy; each prefill/decode instance is an actor (in
a placement group for TP > 1) on a node with the resources it asks for, running the local
launcher's command for it (launch/ray_plan.py) and supervising it (launch/ray_actors.py). Keys
and tokens reach the nodes as Ray objects and are written owner-only there. This process
watches: an instance whose process exits is taken out of the proxy's pools, restarted, and put
back once ready (its connector registers with the coordinator again); one whose actor or node
is gone is placed again, off the node it was lost on while another node offers its resources.
``pd scale`` changes the pools' sizes, draining an instance before stopping it. Ctrl-C stops
everything on every node. See docs/design.md ("A deployment on Ray").
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.config import ConfigError, to_dict
from launch.auth import check_keys
from launch.ray_actors import Controls, ProcHost
from launch.ray_plan import (
    ALLOW_LIST,
    GROUPS,
    HEAD_RESOURCE,
    Slot,
    away_from,
    check_ray,
    control_options,
    control_specs,
    default_secrets_dir,
    instance_bundles,
    instance_options,
    instance_spec,
    layout_on,
    node_config,
    own_ray_keys,
    pool_bind,
    proxy_address,
    secret_files,
    slots,
)
from launch.supervise import ChildDied, Progress, default_run_dir, serve_until_stopped
from pd.config import HOST_ROLES, DeploymentConfig
from pd.connector.heads import group_tp
from pd.coordinator.curve import INSTANCES

PLACE_TIMEOUT_S = 60.0  # an actor not placed by then: no node has what it asks for
CALL_TIMEOUT_S = 30.0


def import_ray():
    """The ray module; ConfigError saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise ConfigError("Ray is not installed here; pd launch --ray and pd scale need it on this machine and "
                          "on every node of the cluster: pip install 'pdkv[ray]'") from None
    return ray


def controls_name(dep: DeploymentConfig) -> str:
    """The name of the launcher's ``Controls`` actor (``pd scale`` finds it by it)."""
    return f"controls-{dep.proxy.port}"


@dataclass
class Member:
    """One instance: its actor (and placement group), where it runs, and its state."""

    slot: Slot
    actor: Any = None
    pg: Any = None
    ip: str = ""
    node: str = ""  # its Ray node id
    url: str = ""
    state: str = "starting"  # starting, ready, restarting, gone
    pending: Any = None  # the ObjectRef of its start/restart (seconds until ready)
    restarts: int = 0


class RayDeployment:
    """The deployment on the cluster; ``start``, ``watch``, ``scale``, ``stop``."""

    def __init__(self, dep: DeploymentConfig, progress: Progress = print):
        check_ray(dep)
        own_ray_keys(dep)
        check_keys(dep, list(HOST_ROLES))
        self.dep, self.progress = dep, progress
        self.run_dir = Path(dep.run_dir).resolve() if dep.run_dir else default_run_dir("ray").resolve()
        self.secrets_dir = default_secrets_dir(dep)
        self.token = secrets.token_urlsafe(32)
        self.members: dict[str, Member] = {}
        self.control: Any = None
        self.controls: Any = None
        self.applied = 0  # the last pd scale request applied
        self.reported = 0  # the last one reported finished (its new instances ready)
        self.gone: set[str] = set()  # non-critical control processes that exited (reported once)
        self._t0 = time.monotonic()

    # ---- start -----------------------------------------------------------------------------

    def connect(self, address: str) -> None:
        ray = import_ray()
        ray.init(address=address or self.dep.ray.address, namespace=self.dep.ray.namespace, log_to_driver=False,
                 logging_level="ERROR")
        have = ray.cluster_resources()
        r = self.dep.ray
        for key, res in (("control_resource", r.control_resource or HEAD_RESOURCE),
                         ("prefill_resource", r.prefill_resource), ("decode_resource", r.decode_resource)):
            if res and res not in have:
                offered = ", ".join(sorted(k for k in have if not k.startswith("node:"))) or "none"
                raise ConfigError(f"ray.{key}: no node of the Ray cluster offers resource {res!r} (offered: "
                                  f"{offered}); start a node with ray start --resources '{{\"{res}\": 1}}'")
        self.device = "cuda" if self.dep.vllm.device == "cuda" or (
            self.dep.vllm.device == "auto" and have.get("GPU")) else "cpu"

    def _get(self, ref: Any, what: str, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        import ray

        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ChildDied(f"{what}: no answer in {timeout_s:.0f}s (Ray could not place or run it; `ray status` "
                            "shows what each node offers)") from None
        except ray.exceptions.RayError as e:  # what the actor raised (its process exited, a bad secrets dir)
            raise ChildDied(f"{what}: {_cause(e)}") from None

    def start(self) -> None:
        """Start the control processes, the instances and the proxy; wait until all are ready."""
        import ray

        Host = ray.remote(ProcHost)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.dep), sort_keys=False))
        self.control = Host.options(**control_options(self.dep), max_concurrency=8).remote(str(self.run_dir))
        self.control_ip = self._get(self.control.info.remote(), "the control actor", PLACE_TIMEOUT_S)["ip"]
        self.ndep = node_config(self.dep, self.secrets_dir, self.control_ip)
        files = ray.put(secret_files(self.dep, True, self.token))
        self._get(self.control.install.remote(self.secrets_dir, files, (ALLOW_LIST,)), "the control node's keys")
        self.lay = layout_on(self.ndep, [], self.control_ip)
        servers, self.proxy = control_specs(self.ndep, self.lay, self.secrets_dir)
        want = [s for g in GROUPS for s in slots(self.dep, g, getattr(self.dep, g).count)]
        self.progress(f"pdkv: starting pd deployment on Ray: {', '.join(s.name for s in servers)}, "
                      f"{', '.join(s.name for s in want)}, proxy (logs in {self.run_dir} on each node)")
        for spec in servers:
            self._get(self.control.start.remote(spec), spec.name)
            self._ready_line(spec.name, spec.port, self._get(self.control.wait_ready.remote(
                spec.name, self.dep.vllm.startup_timeout_s), spec.name, self.dep.vllm.startup_timeout_s + 30))
        for s in want:
            self._place(Member(s))
        self.lay = layout_on(self.ndep, [(m.slot, m.ip) for m in self.members.values()], self.control_ip)
        _, self.proxy = control_specs(self.ndep, self.lay, self.secrets_dir)
        self._await_members(want)
        self._get(self.control.start.remote(self.proxy), "proxy")
        self._ready_line("proxy", self.proxy.port, self._get(self.control.wait_ready.remote(
            "proxy", self.dep.vllm.startup_timeout_s), "proxy", self.dep.vllm.startup_timeout_s + 30))
        # on the control node too: anywhere else, losing that node would stop the deployment
        self.controls = ray.remote(Controls).options(name=controls_name(self.dep), **control_options(self.dep)).remote(
            self.dep.prefill.count, self.dep.decode.count)
        self.proxy_url = proxy_address(self.dep, self.control_ip)

    def _ready_line(self, name: str, port: int | None, _seconds: float, again: str = "") -> None:
        where = f" on port {port}" if port else ""
        self.progress(f"  {name:<14} ready{again}{where} ({time.monotonic() - self._t0:.0f}s)")

    def _place(self, m: Member, away: dict[str, str] | None = None) -> None:
        """Place ``m``'s actor (in a placement group for TP > 1) on a node matching the label
        selector ``away`` if given, send it the keys, start its vLLM."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = instance_bundles(self.dep, m.slot.group, self.device)
        opts = instance_options(bundles)
        if len(bundles) > 1:
            m.pg = placement_group(bundles, strategy="STRICT_PACK",
                                   **({"bundle_label_selector": [away] * len(bundles)} if away else {}))
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(m.pg, placement_group_bundle_index=0)
        elif away:
            opts["label_selector"] = away
        m.actor = ray.remote(ProcHost).options(max_concurrency=4, **opts).remote(str(self.run_dir))
        info = self._get(m.actor.info.remote(group_tp(self.dep, m.slot.group)),
                         f"{m.slot.name} (asks for {bundles})", PLACE_TIMEOUT_S)
        files = secret_files(self.dep, False, self.token, m.slot.name)
        self._get(m.actor.install.remote(self.secrets_dir, ray.put(files)), f"{m.slot.name}'s keys")
        bind = pool_bind(self.dep, m.slot.group)
        spec = instance_spec(self.ndep, m.slot, info["ip"], info["split"] if bind == "split" else bind,
                             self.lay.coordinator_address, info["gpus"] if self.device == "cuda" else "",
                             own_key=f"{INSTANCES}/{m.slot.name}.key_secret" in files)
        m.ip, m.node, m.url, m.state = info["ip"], info["node_id"], spec.health_url.rsplit("/health", 1)[0], "starting"
        self._get(m.actor.start.remote(spec), m.slot.name)
        m.pending = m.actor.wait_ready.remote(m.slot.name, self.dep.vllm.startup_timeout_s)
        self.members[m.slot.name] = m

    def _await_members(self, names: list[Slot]) -> None:
        """Wait until the instances ``names`` are ready (a ready line each); ChildDied if one fails."""
        import ray

        pending = {self.members[s.name].pending: self.members[s.name] for s in names}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=self.dep.vllm.startup_timeout_s)
            if not done:
                raise ChildDied(f"not ready after {self.dep.vllm.startup_timeout_s:.0f}s: "
                                f"{', '.join(m.slot.name for m in pending.values())}")
            m = pending.pop(done[0])
            try:
                seconds = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - the actor's RuntimeError names the exit and log
                raise ChildDied(_cause(e)) from None
            m.state, m.pending = "ready", None
            self._ready_line(m.slot.name, m.slot.port, seconds)

    # ---- watch -----------------------------------------------------------------------------

    def say(self, line: str) -> None:
        self.progress(line)
        if self.controls is not None:
            self.controls.say.remote(line)

    def push_pools(self) -> None:
        """Tell the proxy the ready instances of each pool."""
        body = {g: [m.url for m in self.members.values() if m.slot.group == g and m.state == "ready"] for g in GROUPS}
        key = self.ndep.proxy.api_key_file
        self._get(self.control.pools.remote(body, f"{self.secrets_dir}/admin.token", key), "the proxy's pools")

    def watch(self, interval_s: float = 0.5) -> None:
        """Supervise until interrupted (ChildDied if the coordinator or the proxy exits)."""
        import ray

        while True:
            for name, how in self._get(self.control.poll.remote(), "the control actor").items():
                if name in ("coordinator", "proxy"):
                    raise ChildDied(how)
                if name not in self.gone:
                    self.gone.add(name)
                    self.say(f"pdkv: {how}\npdkv: the rest goes on without it (transfers fall back to the store, "
                             "then recompute)")
            self._check_members(ray)
            self._apply_scale()
            time.sleep(interval_s)

    def _check_members(self, ray: Any) -> None:
        changed = False
        for m in list(self.members.values()):
            if m.state == "gone":
                continue
            if m.pending is not None:
                done, _ = ray.wait([m.pending], timeout=0)
                if done:
                    changed |= self._finished_start(ray, m)
                continue
            try:
                exited = ray.get(m.actor.poll.remote(), timeout=CALL_TIMEOUT_S).get(m.slot.name)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                self._lost(m, f"{m.slot.name}'s actor on {m.ip} is gone ({type(e).__name__})", replace=True)
                changed = True
                continue
            if exited:
                self._lost(m, exited, replace=False)
                changed = True
        if changed:
            self.push_pools()

    def _finished_start(self, ray: Any, m: Member) -> bool:
        """``m``'s start or restart ended: ready (back in the pools), or lost again."""
        try:
            seconds = ray.get(m.pending)
        except ray.exceptions.RayActorError as e:
            m.pending = None
            self._lost(m, f"{m.slot.name}'s actor on {m.ip} is gone ({type(e).__name__})", replace=True)
            return True
        except Exception as e:  # noqa: BLE001 - its process exited while starting (the message says how)
            m.pending = None
            self._lost(m, _cause(e), replace=False)
            return True
        again = " again" if m.restarts else ""
        m.state, m.pending = "ready", None
        self._ready_line(m.slot.name, m.slot.port, seconds, again)
        if self.controls is not None:
            self.controls.say.remote(f"  {m.slot.name} ready{again} at {m.url}")
        return True

    def _lost(self, m: Member, how: str, replace: bool) -> None:
        """``m``'s process (or actor) is gone: out of the pools; restarted while restarts are left."""
        m.state = "restarting"
        self.say(f"pdkv: {how}")
        self.push_pools()  # out of the pools now: placing it again may take a while
        if m.restarts >= self.dep.ray.restarts:
            m.state = "gone"
            self.say(f"pdkv: {m.slot.name} restarted {m.restarts} times (ray.restarts); going on without it")
            return
        m.restarts += 1
        self.say(f"pdkv: restarting {m.slot.name} ({m.restarts} of {self.dep.ray.restarts}"
                 f"{f', off node {m.ip} if another node offers its resources' if replace else ''}); the proxy "
                 "routes around it meanwhile")
        if replace:
            self._place_again(m)
        else:
            m.pending = m.actor.restart.remote(m.slot.name, self.dep.vllm.startup_timeout_s)

    def _place_again(self, m: Member) -> None:
        """Place ``m``, whose actor was lost, off the node it was lost on while another node offers
        its resources (``away_from``: that node may be dead without Ray knowing it yet), then on
        any node if none took it."""
        import ray

        lost = m.node
        away = away_from(lost, ray.nodes(), instance_bundles(self.dep, m.slot.group, self.device))
        for selector in ([away, {}] if away else [{}]):
            self._drop_actor(m)
            try:
                self._place(m, selector)
            except ChildDied as e:
                why = e
                if selector:
                    self.say(f"pdkv: {m.slot.name}: no other node took it ({e}); trying every node")
                continue
            self.say(f"pdkv: {m.slot.name} placed again on {'another' if m.node != lost else 'the same'} node ({m.ip})")
            return
        self._drop_actor(m)
        m.state = "gone"
        self.say(f"pdkv: {m.slot.name} cannot be placed again: {why}")

    def _drop_actor(self, m: Member) -> None:
        import ray

        try:
            ray.kill(m.actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if m.pg is not None:
            ray.util.remove_placement_group(m.pg)
            m.pg = None

    # ---- scale -----------------------------------------------------------------------------

    def _apply_scale(self) -> None:
        serial, targets = self._get(self.controls.wanted.remote(), "the controls actor")
        if serial > self.applied:
            self.applied = serial
            try:
                self.scale(targets)
            except ChildDied as e:
                self.say(f"pdkv: scaling failed: {e}")
        if self.applied > self.reported and not any(m.state in ("starting", "restarting")
                                                    for m in self.members.values()):
            self.reported = self.applied
            self.controls.finished.remote(self.applied)

    def scale(self, targets: dict[str, int]) -> None:
        """Add instances (they join the pools once ready) or drain and stop the newest ones."""
        for group, n in targets.items():
            if n > self.dep.ray.max_per_pool:
                self.say(f"pdkv: {group}={n} refused: more than ray.max_per_pool ({self.dep.ray.max_per_pool}), the "
                         "instances whose keys the coordinator was started with")
                continue
            live = sorted((m for m in self.members.values() if m.slot.group == group and m.state != "gone"),
                          key=lambda m: m.slot.index)
            if n > len(live):
                used = {m.slot.index for m in live}
                free = [s for s in slots(self.dep, group, n + len(used)) if s.index not in used][:n - len(live)]
                self.say(f"pdkv: scaling {group} {len(live)} -> {n}: starting {', '.join(s.name for s in free)}")
                for s in free:
                    self._place(Member(s))
            elif n < len(live):
                self.say(f"pdkv: scaling {group} {len(live)} -> {n}")
                for m in live[n:][::-1]:
                    self.drain(m)

    def drain(self, m: Member) -> None:
        """Out of the proxy's pools, wait for the requests begun before that, then stop ``m``."""
        m.state = "gone"
        self.push_pools()
        since = self._get(self.control.pools.remote(None, f"{self.secrets_dir}/admin.token",
                                                    self.ndep.proxy.api_key_file), "the proxy's pools")["now"]
        self.say(f"pdkv: draining {m.slot.name}: out of the proxy's pools, waiting for its requests")
        deadline = time.monotonic() + self.dep.ray.drain_timeout_s
        while time.monotonic() < deadline:
            view = self._get(self.control.pools.remote(None, f"{self.secrets_dir}/admin.token",
                                                       self.ndep.proxy.api_key_file), "the proxy's pools")
            if view["oldest"] is None or view["oldest"] > since:
                break
            time.sleep(0.2)
        else:
            self.say(f"pdkv: {m.slot.name}: requests still in flight after {self.dep.ray.drain_timeout_s:.0f}s "
                     "(ray.drain_timeout_s); stopping it anyway")
        self._get(m.actor.stop_all.remote(), f"stopping {m.slot.name}", 60)
        self._drop_actor(m)
        del self.members[m.slot.name]
        self.say(f"pdkv: {m.slot.name} stopped")

    # ---- stop ------------------------------------------------------------------------------

    def stop(self) -> None:
        """The proxy first, then every instance, then the control processes; actors removed."""
        import ray

        if not ray.is_initialized():
            return
        if self.control is not None:
            _quiet(lambda: ray.get(self.control.stop.remote("proxy"), timeout=60))
        refs = [m.actor.stop_all.remote() for m in self.members.values() if m.actor is not None]
        _quiet(lambda: ray.get(refs, timeout=60))
        if self.control is not None:
            _quiet(lambda: ray.get(self.control.stop_all.remote(), timeout=60))
        for m in list(self.members.values()):
            self._drop_actor(m)
        for a in (self.control, self.controls):
            if a is not None:
                _quiet(lambda a=a: ray.kill(a))
        ray.shutdown()


def _quiet(fn) -> None:
    """Run ``fn``; while stopping, an actor already gone is not an error."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - a node or actor gone while stopping
        pass


def _cause(e: BaseException) -> str:
    """The message of the exception an actor raised (Ray wraps it)."""
    inner = getattr(e, "cause", None)
    return str(inner) if inner is not None else str(e).strip().splitlines()[-1]


def run(dep: DeploymentConfig, address: str) -> int:
    """``pd launch --ray``: 0 after a clean stop (Ctrl-C/SIGTERM), 1 if the deployment failed."""
    d = RayDeployment(dep, progress=lambda line: print(line, flush=True))
    d.connect(address)

    def start() -> str:
        d.start()
        return f"pdkv ready: proxy at {d.proxy_url} (run dir: {d.run_dir})"

    return serve_until_stopped(start, d.watch, d.stop)
