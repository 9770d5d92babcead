#!/usr/bin/env bash
# Install LMCache on the GPU machine (issue 19), after scripts/gpu/setup.sh, from the wheels that
# scripts/gpu/prepare_lmcache.sh put in .carry/p6/lmcache and a device call copied to
# $CARRY/lmcache (default /tmp/carry/lmcache):
#
#   cp -r .carry/p6/lmcache /tmp/carry/ && bash scripts/gpu/setup_lmcache.sh [TARGET]   # default /tmp/vsite
#
# Checks the wheels against SHA256SUMS, installs them --no-deps into TARGET (beside vLLM; lmcache
# requires numpy<=2.2.6 but runs on the image's numpy 2.5.2: not replaced), and checks that what
# vLLM's LMCacheConnectorV1 imports (lmcache.integration.vllm.vllm_v1_adapter.LMCacheConnectorV1Impl)
# imports, that LMCache's CUDA ops load (lmcache 0.5.3: 0.5.4+ need a newer torch than 2.11.0,
# see prepare_lmcache.sh), and, for the multi-process modes (lmcache_mp_*), that LMCache's MP server
# (lmcache.v1.multiprocess.http_server: needs the carried opentelemetry-api and importlib-metadata),
# its vLLM connector (lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector) and the
# fs_native L2 adapter's extension (lmcache.lmcache_fs) import. Idempotent (installs again when the
# carried SHA256SUMS changed). Exit status 1 if the wheels are missing or a check fails.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
T=${1:-/tmp/vsite}
CARRY=${CARRY:-/tmp/carry}
W=$CARRY/lmcache
SECONDS=0
say() { echo "setup_lmcache: $* (${SECONDS}s)"; }

[ -f /tmp/pdkv-gpu.env ] || bash "$REPO/scripts/gpu/setup.sh" "$T"
. /tmp/pdkv-gpu.env
[ -f "$W/SHA256SUMS" ] || [ -f "$T/.lmcache-ok" ] ||
  { echo "setup_lmcache: no $W/SHA256SUMS (copy .carry/p6/lmcache to $CARRY first)"; exit 1; }
if [ -f "$W/SHA256SUMS" ] && ! cmp -s "$W/SHA256SUMS" "$T/.lmcache-ok"; then
  (cd "$W" && sha256sum -c --quiet SHA256SUMS) || { echo "setup_lmcache: a wheel in $W differs from SHA256SUMS"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$T" \
    "$W"/*.whl 2>&1 | grep -v "WARNING: Target directory" || true
  say "$(ls "$W"/*.whl | wc -l) wheels installed into $T"
  cp "$W/SHA256SUMS" "$T/.lmcache-ok"  # what was installed
fi
# LMCache's usage telemetry posts to stats.lmcache.ai; the machine has no network.
grep -q LMCACHE_TRACK_USAGE /tmp/pdkv-gpu.env || echo "export LMCACHE_TRACK_USAGE=false" >> /tmp/pdkv-gpu.env
export LMCACHE_TRACK_USAGE=false
python3 - <<'EOF'
import sys
import numpy
import lmcache
from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl  # what LMCacheConnectorV1 loads
from lmcache.v1.platform import resolve_device_ops
from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1
import lmcache.v1.storage_backend.local_disk_backend, lmcache.v1.storage_backend.local_cpu_backend  # noqa: E401
try:  # LMCache's CUDA extension: its import fails if it was built for another torch (prepare_lmcache.sh)
    ops = type(resolve_device_ops(lmcache.torch_device_type)).__name__
except Exception as e:  # noqa: BLE001
    sys.exit(f"setup_lmcache: LMCache's {lmcache.torch_device_type} ops did not load: {type(e).__name__}: {e}")
print(f"setup_lmcache: lmcache {lmcache.__version__} from {lmcache.__file__.rsplit('/', 2)[0]}, numpy {numpy.__version__}, "
      f"device {lmcache.torch_device_type}, ops {ops}; {LMCacheConnectorV1Impl.__name__} and {LMCacheConnectorV1.__name__} import")
try:  # the MP modes only: a failure here is reported, and leaves the other modes' set-up standing
    import lmcache.v1.multiprocess.http_server  # the MP server (pd bench ttft --modes lmcache_mp_*)
    from lmcache.integration.vllm.lmcache_mp_connector import LMCacheMPConnector  # kv_connector_module_path's
    from lmcache.lmcache_fs import LMCacheFSClient  # the fs_native L2 adapter's C++ extension
    from importlib.metadata import version
    print(f"setup_lmcache: lmcache MP mode: lmcache.v1.multiprocess.http_server, {LMCacheMPConnector.__name__} and "
          f"{LMCacheFSClient.__name__} import (opentelemetry-api {version('opentelemetry-api')}, "
          f"importlib-metadata {version('importlib-metadata')})")
except Exception as e:  # noqa: BLE001
    print(f"setup_lmcache: WARNING: LMCache's MP mode will not run (modes lmcache_mp_* fail): {type(e).__name__}: {e}")
if lmcache.torch_device_type != "cuda":
    sys.exit("setup_lmcache: LMCache did not detect the GPU")
EOF
say "ok"
