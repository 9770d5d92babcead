"""Where each part of a deployment runs: roles, hosts, bind and advertised addresses.

A deployment has three roles: ``control`` (the coordinator, the transport's servers and the proxy),
``prefill`` and ``decode`` (the two pools of vLLM instances). ``pd launch`` starts one host's
share: ``--role all`` (the default, everything here), ``--role decode``, ``--role control,prefill``,
or ``--host NAME`` with a ``hosts:`` section naming each host's address and roles.

Addresses: every listener has a bind host (where it listens) and an advertised one (what the
others connect to). Without ``hosts:`` they are ``coordinator.host``/``advertise_host`` and each
group's ``host``/``advertise_host`` (or its explicit ``urls``). With ``hosts:``, a host's
``address`` is advertised and its ``bind`` (default: the address) is listened on, by the
coordinator (on the control host) and by the instances of the pools it runs; each host that
runs a pool runs ``count`` instances of it, named in host order (decode-0, decode-1, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.config import WILDCARD_HOSTS, ConfigError, advertised, url_host
from pd.config import HOST_ROLES, DeploymentConfig
from pd.proxy.routing import parse_urls

ALL = "all"


@dataclass(frozen=True)
class Instance:
    """One vLLM instance of the deployment, wherever it runs."""

    name: str   # prefill-0, decode-1, instance-0 (colocated)
    role: str   # prefill, decode, colocated
    group: str  # prefill or decode: the config section
    port: int   # the port it listens on
    bind: str   # the host it listens on
    url: str    # how the proxy reaches it
    host: str = ""  # the hosts: entry it runs on ("" without hosts:)

    def as_tuple(self) -> tuple[str, str, int, str]:
        """(name, role, port, group), as ``launch.procs.instance_ports`` gives it."""
        return self.name, self.role, self.port, self.group


@dataclass
class Layout:
    """The whole deployment's placement (every host's share)."""

    instances: list[Instance]
    coordinator_bind: str
    coordinator_address: str  # advertised tcp:// address ("" in colocated mode)
    control_host: str = ""  # the hosts: entry that runs control ("" without hosts:)
    hosts: dict[str, list[str]] = field(default_factory=dict)  # host name -> its roles

    def urls(self, role: str) -> list[str]:
        return [i.url for i in self.instances if i.role == role]


def parse_roles(text: str | list[str] | None) -> list[str]:
    """``"all"``/None -> every role; else a comma list of control, prefill, decode (in that order)."""
    if text is None:
        return list(HOST_ROLES)
    words = [w.strip() for w in (text.split(",") if isinstance(text, str) else text) if w.strip()]
    if not words:
        raise ConfigError(f"--role: empty; choose {ALL} or a comma list of {', '.join(HOST_ROLES)}")
    if words == [ALL]:
        return list(HOST_ROLES)
    bad = [w for w in words if w not in HOST_ROLES]
    if bad:
        raise ConfigError(f"--role: {bad[0]!r} is not allowed; choose {ALL} or a comma list of "
                          f"{', '.join(HOST_ROLES)}")
    return [r for r in HOST_ROLES if r in words]


def is_wildcard(host: str) -> bool:
    return host.strip() in WILDCARD_HOSTS


def reach_host(bind: str) -> str:
    """A host to check a local listener on: its bind host, or 127.0.0.1 for a wildcard."""
    return "127.0.0.1" if is_wildcard(bind) else bind.strip("[]")


def _check_hosts(dep: DeploymentConfig) -> None:
    defaults = DeploymentConfig()
    for key, value, default in (
            ("coordinator.host", dep.coordinator.host, defaults.coordinator.host),
            ("coordinator.advertise_host", dep.coordinator.advertise_host, ""),
            *((f"{g}.{k}", getattr(getattr(dep, g), k), getattr(getattr(defaults, g), k))
              for g in ("prefill", "decode") for k in ("host", "advertise_host", "urls"))):
        if value != default:
            raise ConfigError(f"{key}: {value!r} cannot be combined with a hosts: section (the addresses come from "
                              "hosts.<name>.address and .bind there); remove it")
    controls = [n for n, h in dep.hosts.items() if "control" in h.roles]
    for name, h in dep.hosts.items():
        where = f"hosts.{name}"
        if not h.address:
            raise ConfigError(f"{where}.address: missing; give the IP or name the other hosts reach it at")
        advertised(h.bind or h.address, h.address, f"{where}.address", f"{where}.bind")
        if not h.roles:
            raise ConfigError(f"{where}.roles: empty; give some of {', '.join(HOST_ROLES)}")
        for r in h.roles:
            if r not in HOST_ROLES:
                raise ConfigError(f"{where}.roles: {r!r} is not allowed; choose from {', '.join(HOST_ROLES)}")
    if len(controls) != 1:
        raise ConfigError(f"hosts: {len(controls)} hosts have the control role ({', '.join(controls) or 'none'}); "
                          "exactly one must (it runs the coordinator and the proxy)")
    for group in ("prefill", "decode"):
        if getattr(dep, group).count and not any(group in h.roles for h in dep.hosts.values()):
            raise ConfigError(f"hosts: no host has the {group} role, but {group}.count is "
                              f"{getattr(dep, group).count}")


def layout(dep: DeploymentConfig) -> Layout:
    """Place every instance and the coordinator; ConfigError for an address that cannot work."""
    pd_mode = dep.mode == "pd"
    instances: list[Instance] = []

    def add(group: str, i: int, bind: str, url: str, host: str = "") -> None:
        g = getattr(dep, group)
        if pd_mode:
            name, role = f"{group}-{sum(1 for x in instances if x.group == group)}", group
        else:
            name, role = f"instance-{len(instances)}", "colocated"
        instances.append(Instance(name, role, group, g.port_base + i, bind, url, host))

    if dep.hosts:
        _check_hosts(dep)
        for group in ("prefill", "decode"):
            for hname, h in dep.hosts.items():
                if group in h.roles:
                    for i in range(getattr(dep, group).count):
                        port = getattr(dep, group).port_base + i
                        add(group, i, h.bind or h.address, f"http://{url_host(h.address)}:{port}", hname)
        control = next(n for n, h in dep.hosts.items() if "control" in h.roles)
        ch = dep.hosts[control]
        coord_bind = ch.bind or ch.address
        coord_address = f"tcp://{url_host(ch.address)}:{dep.coordinator.advertise_port or dep.coordinator.port}"
        roles = {n: list(h.roles) for n, h in dep.hosts.items()}
        return Layout(instances, coord_bind, coord_address if pd_mode else "", control, roles)

    for group in ("prefill", "decode"):
        g = getattr(dep, group)
        if g.urls:
            urls = parse_urls(",".join(g.urls), f"{group}.urls")
            if len(urls) != g.count:
                raise ConfigError(f"{group}.urls: {len(urls)} URL(s) for {group}.count {g.count}; give one URL "
                                  f"per instance (or set {group}.count: {len(urls)})")
        elif g.count:
            host = advertised(g.host, g.advertise_host, f"{group}.advertise_host", f"{group}.host")
            urls = [f"http://{url_host(host)}:{g.port_base + i}" for i in range(g.count)]
        else:
            urls = []
        for i in range(g.count):
            add(group, i, g.host, urls[i])
    address = dep.coordinator.address if pd_mode else ""
    return Layout(instances, dep.coordinator.host, address, "", {})


def share(dep: DeploymentConfig, roles: str | list[str] | None = None, host: str | None = None) -> tuple[str, list[str]]:
    """(label, roles) of what this launcher runs: ``host`` names a hosts: entry, else ``roles``.

    The label is "" for everything (one host), else the host name or the roles joined by "+".
    """
    if host is not None:
        if roles is not None:
            raise ConfigError("give --host or --role, not both (a host's roles are in hosts.<name>.roles)")
        if not dep.hosts:
            raise ConfigError(f"--host {host}: the config has no hosts: section; use --role instead")
        if host not in dep.hosts:
            raise ConfigError(f"--host: {host!r} is not in hosts:; choose one of {', '.join(dep.hosts)}")
        return host, parse_roles(dep.hosts[host].roles)
    if dep.hosts:
        raise ConfigError(f"the config has a hosts: section; say which host this is with --host "
                          f"({', '.join(dep.hosts)}) instead of --role, or --dry-run to see every host's commands")
    parsed = parse_roles(roles)
    return ("" if parsed == list(HOST_ROLES) else "+".join(parsed)), parsed


def local_instances(lay: Layout, roles: list[str], host: str = "") -> list[Instance]:
    """The instances this launcher starts: those of ``roles`` (on ``host`` with hosts:)."""
    return [i for i in lay.instances if i.group in roles and (not lay.hosts or i.host == host)]
