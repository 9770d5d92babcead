"""pdkv's vLLM KV connector, as vLLM loads it: ``kv_connector_module_path: pd.connector`` and
``kv_connector: PDConnector``.

``facade`` is the class vLLM calls (KVConnectorBase_V1); ``scheduler`` and ``worker`` (+ ``load``)
are its two halves; ``keys``, ``chunk``, ``heads`` and ``kv_layout`` are what both sides share.
``PDConnector`` is imported on first use, so the light modules (keys, chunk, heads) load without
torch or vLLM. See docs/design.md.
"""
from __future__ import annotations

__all__ = ["PDConnector"]


def __getattr__(name: str):
    if name == "PDConnector":  # torch and vLLM: only in the processes that run the connector
        from pd.connector.facade import PDConnector

        return PDConnector
    raise AttributeError(f"module 'pd.connector' has no attribute {name!r}")
