"""The OpenAI-compatible proxy (``pd proxy``): splits each request into its prefill and decode
halves and streams the answer back. server, routing (choosing instances), metrics. See
docs/design.md."""
