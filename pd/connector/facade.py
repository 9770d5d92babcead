"""PDConnector: pdkv's vLLM KV connector (KVConnectorBase_V1), a thin facade over two halves.

vLLM loads it with::

    --kv-transfer-config '{"kv_connector": "PDConnector", "kv_connector_module_path": "pd.connector",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {...pd.config.ConnectorConfig...}}'

and makes one in the scheduler (role SCHEDULER: ``pd.connector.scheduler.SchedulerSide``) and
one in each worker (``pd.connector.worker.WorkerSide``). The hooks, in the order vLLM calls them:

Scheduler side, for each request:
    on_new_request              the request is added: a producer starts following its prompt
    get_num_new_matched_tokens  how many prompt tokens a load will bring (remote prefill, or a
                                prefix in the store); asynchronous
    get_loaded_kv_cache_group_ids  every KV cache group: a load restores them all
    update_state_after_alloc    its blocks are allocated: the load to hand to the workers
    build_connector_meta        each step: loads, saves (chunks that step completes), cancels,
                                preempted requests -> ``PDMetadata``
    update_connector_output     the workers' finished loads
    request_finished            True: the blocks stay held until the workers' saves are done

Worker side:
    register_kv_caches          once, before the first step: the caches' layout, chunk format
    then each step: handle_preemptions (finish reading blocks about to be reused),
    start_load_kv (start this step's loads, cancel aborted ones), wait_for_layer_load and
    save_kv_layer (nothing: whole chunks move outside the forward), wait_for_save (start this
    step's saves), get_finished (requests whose saves / loads are done),
    get_block_ids_with_load_errors (blocks vLLM recomputes); shutdown at the end.

The proxy links the two halves of a request by ``kv_transfer_params.pd_id`` (vLLM appends random
characters to engine request ids, so those never match across instances). See docs/design.md
("One request, step by step") for the rest.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

from common.config import ConfigError, load
from pd.config import ConnectorConfig
from pd.connector.first_wait import FirstSender, FirstWaiter
from pd.connector.heads import HeadGroups, resolve
from pd.connector.keys import layout_fingerprint, make_namespace
from pd.connector.scheduler import PDMetadata, SchedulerSide
from pd.connector.worker import WorkerConfig, WorkerSide
from pd.coordinator.client import CoordinatorClient, InstanceAgent
from pd.coordinator.curve import client_keys_for
from store import make_store
from transport import make_transport, published_check

logger = logging.getLogger("pd.connector")


def _setup_logging() -> None:
    """vLLM configures only its own loggers: give pdkv's a handler in vLLM's processes."""
    root = logging.getLogger("pd")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("(pdkv pid=%(process)d) %(levelname)s %(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


_setup_logging()


def _spec(kv_cache_config):
    return kv_cache_config.kv_cache_groups[0].kv_cache_spec


def _head_groups(vllm_config, cfg: ConnectorConfig, rank: int = 0) -> HeadGroups:
    """This instance's KV-head groups (pd.connector.heads); ConfigError for TP sizes that cannot work."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    return resolve(cfg.head_groups, tp, vllm_config.model_config.get_total_num_kv_heads(), rank)


def _spec_fingerprint(vllm_config, kv_cache_config, heads: HeadGroups) -> bytes:
    """The layout fingerprint, from what both the scheduler and the workers know.

    It describes one head group's chunk (pd.connector.heads), never the TP size: instances of different TP
    sizes with the same head groups share keys. The worker checks that the caches vLLM
    registered have the page size of this spec.
    """
    spec = _spec(kv_cache_config)
    return layout_fingerprint(
        dtype=str(spec.dtype), total_kv_heads=heads.total_heads, head_groups=heads.groups,
        head_size=spec.head_size, block_size=spec.block_size,
        group_page_bytes=spec.page_size_bytes // heads.per_rank,
        layers=len(kv_cache_config.kv_cache_groups[0].layer_names),
        device=str(vllm_config.device_config.device_type), vllm=vllm.__version__,
        cache_dtype=str(vllm_config.cache_config.cache_dtype),
        cpu_isa=torch.backends.cpu.get_cpu_capability(), kind=type(spec).__name__,
    )


def _sync_wait_tokens(cfg: ConnectorConfig, kv_cache_config, heads: HeadGroups) -> int:
    """The longest whole-prompt transfer a decode waits for before loading it in one step: half of
    the transport's pool (``pool_size_mb``), every head group's chunks counted; longer ones are
    read as they come, so that the prefill's pool never has to evict their first chunks."""
    spec = _spec(kv_cache_config)
    layers = len(kv_cache_config.kv_cache_groups[0].layer_names)
    per_token = spec.page_size_bytes // heads.per_rank * heads.groups * layers / spec.block_size
    return int(cfg.transport.pool_size_mb * (1 << 20) / 2 / per_token) if per_token else 0


class PDConnectorMetadata(KVConnectorMetadata):
    def __init__(self, meta: PDMetadata):
        self.meta = meta


def _config(vllm_config) -> ConnectorConfig:
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    cfg = load(ConnectorConfig, extra, prefix="kv_connector_extra_config.")
    block = vllm_config.cache_config.block_size
    if cfg.chunk_size % block:
        raise ConfigError(
            f"kv_connector_extra_config.chunk_size: {cfg.chunk_size} is not a multiple of the "
            f"block size {block}; allowed: multiples of {block}"
        )
    return cfg


class PDConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self.cfg = _config(vllm_config)
        self.block_size = vllm_config.cache_config.block_size
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        if len(groups) > 1:
            raise ConfigError(
                f"PDConnector supports models with one KV cache group; this model has {len(groups)}"
            )
        self._sched: SchedulerSide | None = None
        self._worker = None
        self.heads = _head_groups(vllm_config, self.cfg)
        self.fingerprint = _spec_fingerprint(vllm_config, kv_cache_config, self.heads)
        self.namespace = make_namespace(str(vllm_config.model_config.model), self.fingerprint)
        if role == KVConnectorRole.SCHEDULER:
            # The scheduler only looks keys up (prefix reuse); group 0's chunks stand for all.
            store = make_store(self.cfg.store, 0, writer=False)
            published = published_check(self.cfg.transport) if self.cfg.sync_load == "ready" else None
            # Token 1 from the prefill's scheduler to the decode's, through the coordinator
            # (pd.connector.first_wait): a decode waits for it, a prefill sends it.
            keys = client_keys_for(self.cfg)
            self._first = (FirstWaiter(self.cfg.coordinator, self.cfg.wait_timeout_s, keys=keys)
                           if ktc.is_kv_consumer else None)
            self._first_sender = (FirstSender(CoordinatorClient(self.cfg.coordinator, keys=keys))
                                  if ktc.is_kv_producer else None)
            self._sched = SchedulerSide(self.block_size, ktc.is_kv_producer, ktc.is_kv_consumer,
                                        store=store, namespace=self.namespace, chunk_size=self.cfg.chunk_size,
                                        published=published, groups=self.heads.groups,
                                        sync_wait_s=min(self.cfg.sync_wait_s, self.cfg.wait_timeout_s),
                                        sync_wait_tokens=_sync_wait_tokens(self.cfg, kv_cache_config, self.heads),
                                        first=self._first, first_sender=self._first_sender)
        else:
            self._worker = self._make_worker(vllm_config, ktc)

    def _make_worker(self, vllm_config, ktc) -> WorkerSide:
        rank = get_tensor_model_parallel_rank()
        # On a GPU the transport's shared memory is registered with CUDA: gathers and scatters
        # DMA straight into and out of it.
        on_gpu = str(vllm_config.device_config.device_type) == "cuda"
        keys = client_keys_for(self.cfg)  # CurveZMQ keys (coordinator_keys_dir) or None; missing files: ConfigError
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else None
        transport = make_transport(self.cfg.transport, **({"pin_cuda": True, "device": device} if on_gpu else {}))
        coord = CoordinatorClient(self.cfg.coordinator, keys=keys)
        role = {"kv_producer": "prefill", "kv_consumer": "decode"}.get(ktc.kv_role, "both")
        instance = self.cfg.instance_id or f"{role}-{id(self):x}"
        self._agent_id = instance if rank == 0 else f"{instance}/tp{rank}"
        self._agent = InstanceAgent(
            self.cfg.coordinator, self._agent_id, role, interval_s=self.cfg.heartbeat_interval_s,
            on_free=(lambda free: transport.delete(free.keys)) if transport is not None else None, keys=keys,
            stats=self._instance_stats,
        )
        self._agent.start()
        # Shard by head group (the number in the keys), so prefill and decode of any TP sizes pick
        # the same path. Only an instance that saves KV writes to the store; decode workers read.
        writes = ktc.kv_role != "kv_consumer" and self.cfg.store.write_through == "always"
        heads = _head_groups(vllm_config, self.cfg, rank)
        stores = {g: make_store(self.cfg.store, g, writer=writes) for g in heads.owned}
        config = WorkerConfig(self.cfg, rank, str(vllm_config.model_config.model), self.block_size,
                              instance_id=self._agent_id, heads=heads, fingerprint=self.fingerprint,
                              page_bytes=_spec(self._kv_cache_config).page_size_bytes,
                              num_blocks=getattr(self._kv_cache_config, "num_blocks", None))
        return WorkerSide(config, coord, transport, stores)

    def _instance_stats(self) -> dict[str, float]:
        """The worker's counters, its transport's (``pool_*``) and its store's (``store_*``), sent with
        each heartbeat."""
        w = self._worker
        if w is None:
            return {}
        out = dict(w.stats)
        for prefix, part in (("pool_", w.transport), ("store_", w.store)):
            if part is not None:  # no transport, no store configured
                out.update({prefix + k: v for k, v in part.stats.items() if isinstance(v, (int, float))})
        return out

    # ---- scheduler side (pd.connector.scheduler), in the order vLLM calls the hooks ----------

    def on_new_request(self, request) -> None:
        self._sched.on_new_request(request)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_loaded_kv_cache_group_ids(self, request) -> tuple[int, ...]:
        # A P/D transfer restores the request's own blocks in every group.
        return tuple(range(len(self._kv_cache_config.kv_cache_groups)))

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return PDConnectorMetadata(self._sched.build_connector_meta(scheduler_output))

    def update_connector_output(self, connector_output) -> None:
        self._sched.update_connector_output(connector_output)

    def request_finished(self, request, block_ids):
        return self._sched.request_finished(request, block_ids)

    # ---- worker side (pd.connector.worker), in the order vLLM calls the hooks --------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata) -> None:
        self._worker.handle_preemptions(kv_connector_metadata.meta)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self._worker.start_step(self._get_connector_metadata().meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            self._worker.after_forward(self._get_connector_metadata().meta)

    def get_finished(self, finished_req_ids: set[str]):
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def shutdown(self) -> None:
        if getattr(self, "_first", None) is not None:
            self._first.close()
        if getattr(self, "_first_sender", None) is not None:
            self._first_sender.close()
            self._first_sender.client.close()
        if self._worker is not None:
            self._worker.shutdown()
            self._agent.stop()
            if self._worker.transport is not None:
                self._worker.transport.close()
            for store in self._worker.stores.values():
                if store is not None:
                    store.close()
