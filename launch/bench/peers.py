"""The deployments of ``pd bench ttft --device cuda`` (issue 19): pdkv's store beside LMCache's.

Modes, each started and stopped in turn on the same GPU(s), same model and prompts, vLLM's own
prefix cache off in all (``--no-enable-prefix-caching``: a warm request can only be served by the
store or LMCache, never by KV left in the GPU):

* ``pdkv``: pdkv 1P1D (``launch.bench.gpu.gpu_deployment`` mode ``pd``) with ``connector.store``
  backend local in a fresh directory: the prefill instance writes each chunk through to it and
  loads a stored prefix on a repeat;
* ``pdkv_dram``: the same with the store's DRAM tier (``connector.store.dram_gb``) in front of it;
* ``lmcache_disk``: one vLLM instance with vLLM's ``LMCacheConnectorV1`` (``kv_both``) and LMCache's
  local disk backend (``local_cpu: false``: LMCache's CPU memory only stages, it keeps nothing);
* ``lmcache_cpu``: the same with LMCache's CPU (DRAM) tier (``local_cpu: true``) and no disk;
* ``lmcache_mp_disk``, ``lmcache_mp_cpu``: LMCache in its multi-process mode (``launch.bench.lmcache_mp``):
  one vLLM instance with ``LMCacheMPConnector`` (kv_both) talking to a separate LMCache server with a
  local-disk L2 (every warm hit read from its files) or its DRAM L1 alone.

The in-process LMCache modes (``LMCACHE_MODES``) are configured by a YAML file in the run's work
directory, named by ``LMCACHE_CONFIG_FILE`` in the instance's environment (LMCache reads it at the
connector's start; ``LMCACHE_*`` variables would override its keys, none is set). Both tiers'
directories are fresh temporary ones on the same filesystem (``launch.scratch_store``). On vLLM
0.26 their connector restores KV to the wrong places (LMCache issue 4463); the MP modes are
LMCache's path for current vLLM. Nothing here imports LMCache: the vLLM instance (and the MP
server) does.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from types import SimpleNamespace

import yaml

from common.config import merge
from launch.bench.gpu import gpu_deployment
from launch.bench.lmcache_mp import L2_ADAPTERS, MP_MODES, SERVER_LOG, instance_env, kv_transfer_config, retrieved
from pd.config import DeploymentConfig

LMCACHE_MODES = ("lmcache_disk", "lmcache_cpu")  # in-process (LMCacheConnectorV1, a YAML file)
TTFT_MODES = ("pdkv", "pdkv_dram", *LMCACHE_MODES, *MP_MODES)
BLOCK_SIZE = 32  # vLLM's --block-size in every mode (LMCache's MP connector needs chunks of whole blocks)
NO_PREFIX_CACHE = "--no-enable-prefix-caching"
# pdkv's store write queue: a put beyond it is dropped, never waited for (store/queue.py); the
# default 256 MB holds 8 chunks of 256 tokens of an 8B model, a 16k-token prompt writes 64.
STORE_QUEUE_MB = 4096
# vLLM's connector (vllm/distributed/kv_transfer/kv_connector/v1/lmcache_connector.py); without
# "use_native" in kv_connector_extra_config it loads lmcache.integration.vllm.vllm_v1_adapter.
LMCACHE_KV = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
# What the instances' logs say about a warm request (counted per mode, as evidence of the hits):
# LMCache's scheduler side ("LMCache hit tokens: N, need to load: M"), pdkv's prefill connector
# (the MP modes: their server's log, launch.bench.lmcache_mp.RETRIEVED).
HIT_LINES = {"lmcache": re.compile(r"LMCache hit tokens: (\d+)"),
             "pdkv": re.compile(r"loaded a (\d+)-token prefix from the store")}


def add_cuda_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--device cuda (pdkv's store beside LMCache; scripts/gpu/lmcache.sh)")
    g.add_argument("--modes", default="pdkv,lmcache_disk,lmcache_cpu",
                   help=f"comma list of {', '.join(TTFT_MODES)} (default pdkv,lmcache_disk,lmcache_cpu)")
    g.add_argument("--lengths", default="2048,8192,max",
                   help="prompt lengths, tokens; 'max' = the longest the model allows (--max-model-len less "
                        "--max-tokens and 8) (default 2048,8192,max)")
    g.add_argument("--max-model-len", type=int, default=0,
                   help="vLLM --max-model-len (default 0: the model's max_position_embeddings)")
    g.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    g.add_argument("--load-format", default="auto", help="vLLM --load-format (default auto: the model's weights)")
    g.add_argument("--kv-cache-gb", type=float, default=12.0, help="KV cache per instance, GiB (default 12)")
    g.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", default=True,
                   help="no CUDA graphs (the default here: a start takes less, TTFT is the prefill's)")
    g.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false")
    g.add_argument("--chunk-size", type=int, default=256, help="pdkv connector.chunk_size (default 256)")
    g.add_argument("--store-gb", type=float, default=40.0, help="pdkv connector.store.size_gb (default 40)")
    g.add_argument("--dram-gb", type=float, default=16.0, help="pdkv_dram: connector.store.dram_gb (default 16)")
    g.add_argument("--read-threads", type=int, default=4,
                   help="pdkv: connector.store.read_threads, readers of one batch of chunks (default 4)")
    g.add_argument("--io-threads", type=int, default=2,
                   help="pdkv: connector.io_threads; the staging pool is 8 chunks a thread and a store load "
                        "reads a quarter of it at once (default 2: 4 chunks)")
    g.add_argument("--lmcache-chunk-size", type=int, default=256,
                   help="LMCache chunk_size, the MP server's --chunk-size (default 256, LMCache's; the MP modes: a "
                        f"multiple of vLLM's block size {BLOCK_SIZE})")
    g.add_argument("--lmcache-cpu-gb", type=float, default=16.0,
                   help="LMCache max_local_cpu_size, GB: lmcache_cpu's tier, lmcache_disk's staging; the MP "
                        "server's --l1-size-gb (pinned DRAM): lmcache_mp_cpu's tier, lmcache_mp_disk's write buffer "
                        "(default 16)")
    g.add_argument("--lmcache-l2", choices=L2_ADAPTERS, default="fs_native",
                   help="lmcache_mp_disk: the MP server's local-disk L2 adapter (default fs_native: LMCache's C++ "
                        "file workers; fs: its Python one)")
    g.add_argument("--lmcache-mp-wait-s", type=float, default=60.0,
                   help="lmcache_mp_disk: before a warm send, wait at most this long for the MP server's disk "
                        "writes to finish (its GET /status); a timeout is reported and fails the run, the warm send "
                        "goes anyway (default 60)")
    g.add_argument("--lmcache-disk-gb", type=float, default=40.0, help="LMCache max_local_disk_size, GB; lmcache_mp_disk with fs_native: "
                        "its L2's max_capacity_gb (default 40)")
    g.add_argument("--settle-s", type=float, default=2.0,
                   help="pause between a prompt's cold and warm sends, for the stores' writes (default 2)")
    g.add_argument("--deadline", type=float, default=0.0,
                   help="epoch seconds: a mode is not started if less than --mode-budget-s remain (default 0: none)")
    g.add_argument("--mode-budget-s", type=float, default=100.0,
                   help="time one mode needs (start, requests, stop), for --deadline (default 100)")
    g.add_argument("--out", default=None, help="JSON results (default $OUT/ttft_gpu.json, else ./ttft_gpu.json); "
                                               "the tables beside it as .md")


def mode_list(text: str) -> list[str]:
    """``--modes`` checked: known names, each once."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes:
        raise ValueError(f"--modes: none given; choose from {', '.join(TTFT_MODES)}")
    bad = [m for m in modes if m not in TTFT_MODES]
    if bad:
        raise ValueError(f"--modes: unknown {', '.join(bad)}; allowed {', '.join(TTFT_MODES)}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"--modes: {text} names a mode twice; give each once")
    return modes


def model_max_len(model: Path) -> int:
    """The model's ``max_position_embeddings`` (config.json)."""
    try:
        n = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--max-model-len 0: cannot read max_position_embeddings from {model}/config.json "
                         f"({type(e).__name__}: {e}); give --max-model-len") from None
    return int(n)


def lengths(text: str, max_model_len: int, max_tokens: int, chunk: int) -> list[int]:
    """``--lengths`` as token counts: each leaves room for the answer and holds at least two chunks
    of the larger chunk size (a shorter prompt has nothing stored to reuse)."""
    longest = max_model_len - max_tokens - 8
    out = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        if part == "max":
            n = longest
        elif part.isdigit():
            n = int(part)
        else:
            raise ValueError(f"--lengths: {part!r} is not a token count or 'max'")
        if not 2 * chunk <= n <= longest:
            raise ValueError(f"--lengths: {n} tokens is not allowed; allowed {2 * chunk}..{longest} (two chunks of "
                             f"{chunk} tokens up to --max-model-len {max_model_len} less --max-tokens {max_tokens} "
                             "and 8)")
        out.append(n)
    if not out:
        raise ValueError("--lengths: none given; e.g. 2048,8192,max")
    return list(dict.fromkeys(out))


def check_args(args: argparse.Namespace) -> None:
    """Refuse what cannot run, with what is allowed (the GPU is not touched)."""
    for key, lo in (("prompts", 1), ("max_tokens", 1), ("chunk_size", 16), ("lmcache_chunk_size", 16),
                    ("read_threads", 1), ("io_threads", 1)):
        if getattr(args, key) < lo:
            raise ValueError(f"--{key.replace('_', '-')}: {getattr(args, key)} is not allowed; at least {lo}")
    for key in ("read_threads", "io_threads"):
        if getattr(args, key) > 64:
            raise ValueError(f"--{key.replace('_', '-')}: {getattr(args, key)} is not allowed; at most 64")
    for key in ("kv_cache_gb", "store_gb", "dram_gb", "lmcache_cpu_gb", "lmcache_disk_gb"):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key.replace('_', '-')}: {getattr(args, key)} is not allowed; give GB > 0")
    if args.settle_s < 0 or args.mode_budget_s < 0:
        raise ValueError("--settle-s / --mode-budget-s: negative seconds are not allowed")
    if args.lmcache_mp_wait_s <= 0:
        raise ValueError(f"--lmcache-mp-wait-s: {args.lmcache_mp_wait_s} is not allowed; give seconds > 0")
    if args.backend != "local":
        raise ValueError(f"--device cuda: --backend {args.backend} is not allowed here; pdkv's rows use the "
                         "local store (the LMCache rows use local disk and DRAM)")


def check_modes(args: argparse.Namespace, modes: list[str]) -> None:
    """What only some modes need: the MP modes' LMCache chunks hold whole vLLM blocks (its MP
    connector asserts it)."""
    mp = [m for m in modes if m in MP_MODES]
    if mp and args.lmcache_chunk_size % BLOCK_SIZE:
        raise ValueError(f"--lmcache-chunk-size: {args.lmcache_chunk_size} is not allowed with {', '.join(mp)}; "
                         f"give a multiple of vLLM's block size {BLOCK_SIZE}")


def lmcache_config(mode: str, args: argparse.Namespace, disk_path: str | Path) -> dict:
    """The LMCache YAML of ``mode`` (keys of lmcache.v1.config; others keep LMCache's defaults)."""
    if mode not in LMCACHE_MODES:
        raise ValueError(f"{mode!r} is not an LMCache mode; allowed {', '.join(LMCACHE_MODES)}")
    cfg = {"chunk_size": args.lmcache_chunk_size, "max_local_cpu_size": args.lmcache_cpu_gb,
           "save_unfull_chunk": False, "internal_api_server_enabled": False}
    if mode == "lmcache_disk":
        cfg.update(local_cpu=False, local_disk=f"file://{Path(disk_path).resolve()}/",
                   max_local_disk_size=args.lmcache_disk_gb)
    else:
        cfg.update(local_cpu=True)
    return cfg


def write_lmcache_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def serve_namespace(args: argparse.Namespace, max_model_len: int) -> SimpleNamespace:
    """What ``gpu_deployment`` reads, from ``pd bench ttft``'s options: vLLM's own step size
    (--max-num-batched-tokens) for every mode, pdkv's chunks in the prefill's GPU memory."""
    return SimpleNamespace(port=args.port, kv_cache_gb=args.kv_cache_gb, load_format=args.load_format,
                           max_model_len=max_model_len, block_size=BLOCK_SIZE, max_num_seqs=8,
                           enforce_eager=args.enforce_eager, gpu_memory_utilization=0.0,
                           chunk_size=args.chunk_size, gpu_pool_mb=4096, pool_mb=16384, prefill_step_tokens=0,
                           ucx_tls="", dtype="default")


def deployment(mode: str, model: str, args: argparse.Namespace, max_model_len: int, n_gpus: int,
               store_path: str | Path, lmcache_yaml: str | Path = "", mp_port: int = 0) -> DeploymentConfig:
    """The DeploymentConfig of ``mode``: pdkv 1P1D on ``n_gpus`` GPUs (1: both on GPU 0) with its store
    in ``store_path``, or one LMCache instance on GPU 0 (reading ``lmcache_yaml``; an MP mode: reaching
    its server's ZMQ port ``mp_port``)."""
    ns = serve_namespace(args, max_model_len)
    if mode in ("pdkv", "pdkv_dram"):
        store = {"backend": "local", "paths": [str(store_path)], "size_gb": args.store_gb, "queue_mb": STORE_QUEUE_MB,
                 "dram_gb": args.dram_gb if mode == "pdkv_dram" else 0.0, "read_threads": args.read_threads}
        dep = gpu_deployment("pd", model, ns, n_gpus, 1, 1)
        return merge(dep, {"vllm": {"extra_args": [NO_PREFIX_CACHE]},
                           "connector": {"store": store, "io_threads": args.io_threads}})
    instance = lmcache_instance(mode, lmcache_yaml, mp_port)
    dep = gpu_deployment("colocated", model, ns, 1, 1, 0)
    return merge(dep, {"vllm": {"extra_args": [NO_PREFIX_CACHE]}, "prefill": instance})


def lmcache_instance(mode: str, lmcache_yaml: str | Path = "", mp_port: int = 0) -> dict:
    """The LMCache instance's ``extra_args`` (its connector) and ``env`` in ``mode``."""
    if mode in MP_MODES:
        if not mp_port:
            raise ValueError(f"{mode}: no LMCache MP server port given")
        return {"extra_args": ["--kv-transfer-config", json.dumps(kv_transfer_config(mp_port))], "env": instance_env()}
    if mode not in LMCACHE_MODES:
        raise ValueError(f"--modes: unknown mode {mode!r}; allowed {', '.join(TTFT_MODES)}")
    if not lmcache_yaml:
        raise ValueError(f"{mode}: no LMCache config file given")
    env = [f"LMCACHE_CONFIG_FILE={Path(lmcache_yaml).resolve()}", "LMCACHE_TRACK_USAGE=false", "PYTHONHASHSEED=0"]
    return {"extra_args": ["--kv-transfer-config", json.dumps(LMCACHE_KV)], "env": env}


def hits_in_logs(run_dir: str | Path, mode: str) -> list[int]:
    """The prefix tokens each warm load served, as the instances' logs tell (LMCache: hit tokens of
    every lookup that found some; LMCache MP: every retrieve its server's log reports; pdkv: each
    prefix loaded from the store)."""
    if mode in MP_MODES:
        return retrieved(Path(run_dir) / SERVER_LOG)
    pattern = HIT_LINES["lmcache" if mode in LMCACHE_MODES else "pdkv"]
    found = []
    for log in sorted(Path(run_dir).glob("*.log")):
        for m in pattern.finditer(log.read_text(errors="replace")):
            if int(m.group(1)) > 0:
                found.append(int(m.group(1)))
    return found
