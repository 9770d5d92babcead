"""The coordinator: matches prefill and decode halves by pd_id, tracks instances, frees chunks.
server (``pd coordinator``), client (instances, proxy, ``pd stats``), protocol (the wire
messages), curve (CurveZMQ keys and ``pd keys``). See docs/design.md."""
