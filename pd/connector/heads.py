"""KV-head groups: how a chunk is sliced by tensor-parallel rank and KV head.

A model's ``H`` KV heads are cut into ``G`` equal groups (``connector.head_groups``; 0 = the
instance's TP size). A chunk holds one group's heads of every layer, and its key names the
group in the place of the rank (``namespace/<group>/<hash>``); the layout fingerprint in the
namespace and in the chunk header carries H, G and the group's page format, never the TP size.
A rank of an instance with TP size ``t`` holds heads ``[r*H/t, (r+1)*H/t)``, that is groups
``[r*G/t, (r+1)*G/t)``, so every group has exactly one writer rank on the prefill side and one
reader rank on the decode side: READY, WAIT and DONE name the group, and a chunk is read once.

Prefill TP ``P`` and decode TP ``D`` work together when both use ``G = lcm(P, D)`` (the launcher
sets it): a rank holding several groups cuts its pages into them when it saves and stitches them
when it loads. Instances with the same ``G`` share the store whatever their TP sizes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from math import gcd
from pathlib import Path

from common.config import ConfigError


def lcm(a: int, b: int) -> int:
    return a * b // gcd(a, b)


@dataclass(frozen=True)
class HeadGroups:
    total_heads: int  # KV heads of the model
    groups: int  # G
    tp: int  # this instance's TP size
    rank: int = 0

    @property
    def per_rank(self) -> int:
        """Groups each rank holds."""
        return self.groups // self.tp

    @property
    def owned(self) -> list[int]:
        """The groups this rank holds, in head order."""
        return list(range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank))

    @property
    def group_heads(self) -> int:
        return self.total_heads // self.groups

    def part(self, group: int) -> tuple[int, int]:
        """(index among this rank's groups, groups per rank): the slice of the rank's heads."""
        return group - self.owned[0], self.per_rank


def resolve(head_groups: int, tp: int, total_heads: int, rank: int = 0,
            key: str = "kv_connector_extra_config.head_groups") -> HeadGroups:
    """The head groups of a rank; ConfigError for a combination that cannot work."""
    if tp < 1 or total_heads < 1:
        raise ConfigError(f"tensor_parallel_size {tp} and KV heads {total_heads} must be positive")
    if tp > total_heads:
        raise ConfigError(f"tensor_parallel_size {tp} is more than the model's {total_heads} KV heads: vLLM then "
                          "replicates heads across ranks, which pdkv does not support; allowed: a TP size "
                          f"that divides {total_heads}")
    if total_heads % tp:
        raise ConfigError(f"tensor_parallel_size {tp} does not divide the model's {total_heads} KV heads")
    g = head_groups or tp
    if g % tp:
        raise ConfigError(f"{key}: {g} is not a multiple of this instance's tensor_parallel_size {tp}; allowed: "
                          f"lcm(prefill TP, decode TP), a multiple of {tp} that divides {total_heads}")
    if total_heads % g:
        raise ConfigError(f"{key}: the model's {total_heads} KV heads do not divide into {g} groups; prefill and "
                          f"decode TP sizes whose lcm ({g}) does not divide {total_heads} cannot exchange KV")
    return HeadGroups(total_heads, g, tp, rank)


def group_tp(dep, group: str) -> int:
    """The TP size of a ``DeploymentConfig``'s ``group`` (prefill or decode) instances."""
    return getattr(dep, group).tp_size(dep.vllm)


def check_deployment(dep) -> None:
    """Refuse a deployment's TP sizes whose KV cannot move between prefill and decode, before
    anything starts: the model's KV heads (its config.json) must divide into the head groups."""
    if dep.mode != "pd":
        return
    p, d = group_tp(dep, "prefill"), group_tp(dep, "decode")
    heads = model_kv_heads(dep.model)
    if heads is None:
        return
    groups = dep.connector.head_groups or lcm(p, d)
    for group, tp in (("prefill", p), ("decode", d)):
        try:
            resolve(groups, tp, heads, key="connector.head_groups")
        except ConfigError as e:
            raise ConfigError(f"{group}.tp {tp} (prefill.tp {p}, decode.tp {d}): {e}") from None


def model_kv_heads(model: str) -> int | None:
    """The KV heads in a model directory's config.json (None if it cannot be read: the launcher's
    model check reports that)."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    return heads if isinstance(heads, int) and heads > 0 else None
