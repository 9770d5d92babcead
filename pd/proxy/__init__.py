"""The OpenAI-compatible proxy (``pd proxy``): splits each request into its prefill and decode
halves and streams the answer back. server (the aiohttp app and its CLI), relay (splitting a
request and relaying its answer), routing (choosing instances, rewriting bodies, errors),
metrics. See docs/design.md."""
