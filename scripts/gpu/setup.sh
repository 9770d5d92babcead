#!/usr/bin/env bash
# Install the carried vLLM + dependencies on the GPU machine (no network there), from the pieces
# that scripts/gpu/prepare.sh made and earlier device calls copied to $CARRY (/tmp/carry).
#
#   bash scripts/gpu/setup.sh [TARGET]   # default /tmp/vsite; then: . /tmp/pdkv-gpu.env
#
# Writes /tmp/pdkv-gpu.env (PYTHONPATH = this repository + TARGET, VLLM_USE_FLASHINFER_SAMPLER=0,
# NVLink multicast off) and checks that vllm and nixl import. Idempotent: a second run only checks.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
T=${1:-/tmp/vsite}
CARRY=${CARRY:-/tmp/carry}
SECONDS=0
say() { echo "setup: $* (${SECONDS}s)"; }

if [ ! -f "$T/.pdkv-ok" ]; then
  ls "$CARRY"/bundle.[0-9]* > /dev/null 2>&1 || { echo "setup: no pieces in $CARRY (copy .carry/pN/* there first)"; exit 1; }
  say "pieces: $(ls "$CARRY" | tr '\n' ' ')"
  mkdir -p "$T" /tmp/pdkv-bundle
  cat "$CARRY"/bundle.[0-9]* > /tmp/pdkv-bundle.tar
  if [ -f "$CARRY/bundle.sha256" ]; then
    [ "$(sha256sum /tmp/pdkv-bundle.tar | cut -d' ' -f1)" = "$(cat "$CARRY/bundle.sha256")" ] ||
      { echo "setup: the pieces do not add up to the bundle (checksum differs: a piece missing or from another prepare run)"; exit 1; }
  fi
  tar -xf /tmp/pdkv-bundle.tar -C /tmp/pdkv-bundle && rm -f /tmp/pdkv-bundle.tar
  say "bundle checked and unpacked"
  xz -T0 -dc /tmp/pdkv-bundle/vllm.tar.xz | tar -xf - -C "$T"
  say "vllm unpacked into $T"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$T" \
    /tmp/pdkv-bundle/wheels/*.whl 2>&1 | grep -v "WARNING: Target directory" || true
  say "$(ls /tmp/pdkv-bundle/wheels | wc -l) wheels installed"
  rm -rf /tmp/pdkv-bundle
  touch "$T/.pdkv-ok"
fi

cat > /tmp/pdkv-gpu.env <<EOF
export PYTHONPATH=$REPO:$T\${PYTHONPATH:+:\$PYTHONPATH}
export PATH=$T/bin:\$PATH
export VLLM_USE_FLASHINFER_SAMPLER=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
EOF
. /tmp/pdkv-gpu.env
python3 - <<'EOF'
import importlib, sys
import torch, vllm
print(f"setup: python {sys.version.split()[0]}, torch {torch.__version__}, vllm {vllm.__version__} "
      f"from {vllm.__file__.rsplit('/', 2)[0]}, GPUs {torch.cuda.device_count()}")
for mod in ("vllm.entrypoints.openai.api_server", "pd.connector.facade", "nixl._api"):
    try:
        importlib.import_module(mod)
        print(f"setup: import {mod}: ok")
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"setup: import {mod}: FAILED: {type(e).__name__}: {e}")
EOF
say "ok (. /tmp/pdkv-gpu.env)"
