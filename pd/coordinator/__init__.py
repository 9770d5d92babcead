"""The coordinator: matches prefill and decode halves by pd_id, tracks instances, frees chunks.
server (``pd coordinator``: the ZMQ loop and its CLI), state (the tables and what each message
does to them), client (instances, proxy, ``pd stats``), protocol (the wire messages), curve
(CurveZMQ keys and ``pd keys``). See docs/design.md."""
