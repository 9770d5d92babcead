"""What transport/, store/ and pd/ all build on: the config schema (common.config) and byte views
of buffers (common.bytes). It imports nothing of pdkv's (docs/design.md, "Layout")."""
