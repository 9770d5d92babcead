#!/usr/bin/env bash
# Prepare LMCache for the GPU machine, HERE (needs PyPI; the GPU machine has no network): issue 19.
#
#   bash scripts/gpu/prepare_lmcache.sh     # -> .carry/p6/lmcache/ (wheels + SHA256SUMS), ~20 MiB
#   LMCACHE_VERSION=0.5.6 ABI_CHECK=0 ...   # another version; without the check against torch 2.11.0
#
# LMCache 0.5.3, not 0.5.6: the CUDA extension of lmcache 0.5.4, 0.5.5 and 0.5.6 (cuda_ops.so) was
# built against a newer torch than the GPU image's 2.11.0+cu130: it needs
# c10::NotImplementedError::NotImplementedError(c10::SourceLocation, std::string), which torch
# 2.11.0 does not export (2.13 does), so its import fails there (undefined symbol) and with it the
# adapter. 0.5.3's c_ops.so needs only symbols torch 2.11.0 exports (and needs
# c10::impl::cow::materialize_cow_storage, which 2.13 no longer exports: built for the older torch).
# The check below (ABI_CHECK, default on) compares the undefined c10/at/torch symbols of the
# wheel's extension modules with what torch 2.11.0's libraries export (the torch wheel, 530 MB, is
# downloaded to $LMCACHE_DL once; only its symbol tables are read) and refuses a wheel that does
# not link. The adapter's API (LMCacheConnectorV1Impl), the config keys used here and the P/D
# messages are the same in 0.5.3 and 0.5.6.
#
# What travels: the lmcache wheel (cp312, CUDA 13 build, 17 MB) and the few wheels that LMCache
# imports on the path of vLLM's LMCacheConnectorV1 (lmcache.integration.vllm.vllm_v1_adapter, the
# local CPU and local disk backends) that neither the GPU image (KINDS.md) nor the vLLM carry
# (prepare.sh) has. Found by importing the adapter here (Python 3.11, LMCache's sources with its
# cp312 extension modules replaced by test doubles, the modules the GPU lacks blocked):
#   aiofile + caio     lmcache.v1.storage_backend.gds_backend imports aiofile at module level, and
#                      storage_backend/__init__ imports gds_backend (every engine does)
#   cryptography       lmcache.v1.distributed.serde (key_provider, aesgcm): 0.5.6 reaches it from the
#                      engine; 0.5.3 from the usage telemetry's config module (carried to be safe)
#   cffi + pycparser   what cryptography's bindings load (cffi) and cffi requires
# and what LMCache's multi-process server (python -m lmcache.v1.multiprocess.http_server, modes
# lmcache_mp_* of `pd bench ttft --device cuda`) imports at module level besides (its
# observability config reaches opentelemetry.metrics/.trace in every configuration):
#   opentelemetry-api==1.40.0    (lmcache 0.5.3 asks for <=1.40.0)
#   importlib-metadata<8.8       (what opentelemetry-api 1.40.0 requires; 8.7.1; its zipp: the image)
# The vLLM-side MP connector (lmcache.integration.vllm.lmcache_mp_connector) needs nothing more.
# Not carried (imported only by backends not used here, or inside try/except ImportError):
# awscrt, redis, google-cloud-bigtable, cufile-python (GDS), nvtx, grpcio-observability,
# httptools, setuptools_scm, confluent-kafka, and opentelemetry-sdk, -semantic-conventions,
# -exporter-prometheus, -exporter-otlp (the MP server's metrics: it runs with --disable-metrics).
# Already on the GPU machine: the image has torch, numpy 2.5.2, numba, cupy-cuda13x,
# cuda-bindings, transformers, psutil, py-cpuinfo, sortedcontainers, prometheus_client, pyyaml,
# aiohttp, aiofiles, httpx, huggingface-hub, safetensors, typing-extensions, zipp; the vLLM carry
# has msgspec, pyzmq, fastapi, uvicorn, cachetools, blake3.
# Pinned / overridden: lmcache requires numpy<=2.2.6, the image has numpy 2.5.2 (numba there is
# built for it): lmcache is installed --no-deps and runs on numpy 2.5.2 (setup_lmcache.sh checks
# that the adapter imports); cuda-python<14,>=13 is met by the image's cuda-bindings (LMCache
# imports cuda.bindings). scripts/gpu/setup_lmcache.sh installs these on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LMCACHE_VERSION=${LMCACHE_VERSION:-0.5.3}
TORCH_VERSION=2.11.0  # the GPU image's (2.11.0+cu130)
PY=${PY:-python3}
DEST=$ROOT/.carry/p6/lmcache
DL=${LMCACHE_DL:-/tmp/lmc}  # a wheel already downloaded there is used
LIMIT_MB=58
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64
      --platform any)
DEPS=(aiofile "caio~=0.12.0" "cryptography>=42" "cffi>=2.0.0" pycparser "opentelemetry-api==1.40.0"
      "importlib-metadata<8.8")

git check-ignore -q .carry/p6 || { echo "prepare_lmcache: .carry/ is not git-ignored; add it to .gitignore first"; exit 1; }
mkdir -p "$DL"
echo "prepare_lmcache: lmcache==$LMCACHE_VERSION"
ls "$DL"/lmcache-"$LMCACHE_VERSION"-cp312-*.whl > /dev/null 2>&1 ||
  $PY -m pip download -q --no-deps "${PLAT[@]}" -d "$DL" "lmcache==$LMCACHE_VERSION" 2>&1 | grep -v "is ignored" || true
WHL=$(ls "$DL"/lmcache-"$LMCACHE_VERSION"-cp312-*.whl | head -1)
rm -rf "$DEST" && mkdir -p "$DEST"
cp "$WHL" "$DEST/"
echo "prepare_lmcache: dependency wheels: ${DEPS[*]}"
$PY -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST" "${DEPS[@]}" 2>&1 | grep -v "is ignored" || true
for name in lmcache aiofile caio cryptography cffi pycparser opentelemetry_api importlib_metadata; do
  ls "$DEST"/"$name"-*.whl > /dev/null 2>&1 || { echo "prepare_lmcache: no $name wheel for cp312 manylinux"; exit 1; }
done
# Requirements of the carried wheels that neither they nor the image meet: those named above as
# left out are listed apart (--known; cuda-python: the image's cuda-bindings); any other stops here.
IMAGE=$(awk '/^IMAGE="/ {on = 1} on {print} on && /"$/ {exit}' scripts/gpu/prepare.sh | sed 's/^IMAGE=//' | tr -d '"')
[ -n "$IMAGE" ] || { echo "prepare_lmcache: no IMAGE list in scripts/gpu/prepare.sh"; exit 1; }
KNOWN=awscrt,cufile-python,nvtx,opentelemetry-sdk,opentelemetry-exporter-otlp,opentelemetry-exporter-prometheus,grpcio-observability,redis,setuptools-scm,httptools,google-api-core,google-cloud-bigtable,cuda-python
$PY scripts/gpu/check_deps.py --known=$KNOWN "$DEST" $IMAGE msgspec pyzmq fastapi uvicorn cachetools blake3 ||
  { echo "prepare_lmcache: a requirement above is neither carried, in the image, nor known to be optional here"; exit 1; }
if [ "${ABI_CHECK:-1}" = 1 ]; then
  echo "prepare_lmcache: do lmcache's extension modules link against torch $TORCH_VERSION?"
  ls "$DL"/torch-"$TORCH_VERSION"-cp312-*.whl > /dev/null 2>&1 ||
    $PY -m pip download -q --no-deps "${PLAT[@]}" -d "$DL" "torch==$TORCH_VERSION" 2>&1 | grep -v "is ignored" || true
  TW=$(ls "$DL"/torch-"$TORCH_VERSION"-cp312-*.whl | head -1)
  X=$(mktemp -d)
  trap 'rm -rf "$X"' EXIT
  unzip -q "$TW" 'torch/lib/libc10.so' 'torch/lib/libc10_cuda.so' 'torch/lib/libtorch.so' 'torch/lib/libtorch_cpu.so' \
    'torch/lib/libtorch_cuda.so' 'torch/lib/libtorch_python.so' -d "$X/torch"
  for f in "$X"/torch/torch/lib/*.so; do nm -D --defined-only "$f" | awk '{print $3}'; done | sort -u > "$X/exported"
  rm -rf "$X/torch" && mkdir -p "$X/lmc"
  (cd "$X/lmc" && $PY -m zipfile -e "$DEST/$(basename "$WHL")" . > /dev/null)
  bad=0
  for so in "$X"/lmc/lmcache/*.so; do
    nm -D --undefined-only "$so" | awk '{print $2}' | { grep -E '^_ZN(K)?(3c10|2at|5torch)' || true; } | sort -u > "$X/needed"
    missing=$(comm -23 "$X/needed" "$X/exported")
    if [ -n "$missing" ]; then
      bad=1
      echo "prepare_lmcache: $(basename "$so") needs what torch $TORCH_VERSION does not export:"
      echo "$missing" | c++filt | sed 's/^/    /'
    fi
  done
  [ "$bad" = 0 ] || { echo "prepare_lmcache: lmcache $LMCACHE_VERSION was built for another torch; its import would fail on the GPU machine (0.5.3 links)"; exit 1; }
  echo "prepare_lmcache: ok: every c10/at/torch symbol lmcache $LMCACHE_VERSION needs is exported by torch $TORCH_VERSION"
fi
(cd "$DEST" && sha256sum ./*.whl > SHA256SUMS)
size_mb=$(du -sm "$DEST" | cut -f1)
ls -l "$DEST" | awk 'NR > 1 {printf "  %9d  %s\n", $5, $9}'
[ "$size_mb" -le "$LIMIT_MB" ] || { echo "prepare_lmcache: $size_mb MiB is over $LIMIT_MB MiB (one device call carries 64 MiB)"; exit 1; }
echo "prepare_lmcache: ok: .carry/p6 ($size_mb MiB); on the GPU: cp -r .carry/p6/lmcache /tmp/carry/ && bash scripts/gpu/setup_lmcache.sh"
