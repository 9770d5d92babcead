#!/usr/bin/env bash
# Set up, make the synthetic model, launch a 1-prefill/1-decode deployment, send requests, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pd demo "$@"
