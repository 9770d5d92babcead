#!/usr/bin/env bash
# Run pdkv's tests: unit tests, then integration tests with real vLLM CPU instances.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
