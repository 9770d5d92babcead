#!/usr/bin/env bash
# Prepare what the GPU machine lacks, HERE (needs PyPI; the GPU machine has no network).
#
#   bash scripts/gpu/prepare.sh          # -> .carry/p1 .. .carry/pN (each one piece < 58 MiB)
#
# The GPU machine (device tool, kinds nvidia-h200*) has Python 3.12, torch 2.11.0+cu130 and most
# of vLLM's dependencies, but no vLLM. vllm==0.26.0 pins torch==2.11.0, so its wheel runs there.
# What travels, in one bundle split into pieces (a device call carries at most 64 MiB):
#   vllm.tar.xz   the vLLM wheel unpacked, without vllm/vllm-rs (an optional 42 MB Rust front
#                 end) and the deep_gemm builds for other Pythons, xz-compressed (~202 MB)
#   wheels/       the missing dependencies of vLLM and pdkv (their closure, minus what the
#                 image already has), and nixl + nixl_cu13 for the NixlConnector comparison
# scripts/gpu/setup.sh unpacks it there; scripts/gpu/README.md has the device call sequence.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VLLM_VERSION=${VLLM_VERSION:-0.26.0}
NIXL_VERSION=${NIXL_VERSION:-1.5.1}   # nixl meta wheel and nixl_cu13 (vLLM main pins nixl 1.5.x in requirements/kv_connectors.txt)
PIECE_MB=${PIECE_MB:-58}
C=$ROOT/.carry
PY=${PY:-python3}
# The GPU machine's platform.
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
      --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64
      --platform any)
# vLLM's dependencies the image lacks (seen on the machine: vLLM serves with these), plus pdkv's.
DEPS=(annotated-types "apache-tvm-ffi==0.1.10" blake3 cachetools cbor2 "depyf==0.20.0" "fastapi>=0.133,<0.137"
      jiter "llguidance>=1.7,<1.8" "model-hosting-container-standards>=0.1.14,<1" msgspec "openai>=2,<3"
      openai-harmony partial-json-parser "prometheus-fastapi-instrumentator>=8" pybase64 "pydantic>=2.12"
      pydantic-core pyzmq sniffio "starlette>=1.0.1" typing-inspection uvicorn watchfiles "xgrammar==0.2.7"
      distro setproctitle python-json-logger ijson astor dill jmespath "supervisor>=4.2")
# The image's packages (KINDS.md, 2026-11-17): a dependency in this list is not carried.
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
mkdir -p "$C/dl" "$C/deps" "$C/bundle/wheels"

echo "prepare: vllm==$VLLM_VERSION wheel"
[ -n "$(ls "$C"/dl/vllm-"$VLLM_VERSION"-*.whl 2>/dev/null)" ] ||
  $PY -m pip download -q --no-deps "${PLAT[@]}" -d "$C/dl" "vllm==$VLLM_VERSION"
WHL=$(ls "$C"/dl/vllm-"$VLLM_VERSION"-*.whl)

if [ ! -s "$C/bundle/vllm.tar.xz" ]; then
  echo "prepare: unpacking and repacking vLLM (xz, a few minutes on 2 cores)"
  rm -rf "$C/site" && mkdir -p "$C/site"
  (cd "$C/site" && $PY -m zipfile -e "$WHL" .)
  rm -f "$C/site/vllm/vllm-rs"
  find "$C/site/vllm/third_party/deep_gemm" -name '_C.cpython-*.so' ! -name '_C.cpython-312-*' -delete
  (cd "$C/site" && tar -cf - . | xz -T0 -6 > "$C/bundle/vllm.tar.xz.tmp") && mv "$C/bundle/vllm.tar.xz.tmp" "$C/bundle/vllm.tar.xz"
  rm -rf "$C/site"
fi

echo "prepare: dependency wheels (the closure of the missing ones, minus the image's packages)"
rm -rf "$C/deps" && mkdir -p "$C/deps"
# --no-deps: resolving them would fetch torch and CUDA wheels the image has. Instead, pins that
# must agree are read from the downloaded metadata, and check_deps.py lists anything unmet.
$PY -m pip download -q --no-deps "${PLAT[@]}" -d "$C/deps" "${DEPS[@]}" 2>&1 | grep -v "is ignored" || true
core=$(unzip -p "$C"/deps/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
rm -f "$C"/deps/pydantic_core-*.whl
$PY -m pip download -q --no-deps "${PLAT[@]}" -d "$C/deps" "pydantic-core==$core" 2>&1 | grep -v "is ignored" || true
$PY -m pip download -q --no-deps "${PLAT[@]}" -d "$C/deps" "nixl==$NIXL_VERSION" "nixl-cu13==$NIXL_VERSION" \
  2>&1 | grep -v "is ignored" || true
$PY scripts/gpu/check_deps.py "$C/deps" $IMAGE
rm -f "$C"/bundle/wheels/*.whl
for w in "$C"/deps/*.whl; do
  name=$(norm "$(basename "$w" | cut -d- -f1)")
  if [[ " $(echo $IMAGE) " == *" $name "* ]]; then continue; fi
  cp "$w" "$C/bundle/wheels/"
done
ls "$C/bundle/wheels" | sed 's/^/  /'
du -sh "$C/bundle/vllm.tar.xz" "$C/bundle/wheels"

echo "prepare: one bundle, split into pieces of $PIECE_MB MiB"
rm -rf "$C"/p[0-9]* "$C/bundle.tar"
(cd "$C/bundle" && tar -cf "$C/bundle.tar" vllm.tar.xz wheels)
(cd "$C" && split -b "${PIECE_MB}M" -d -a 1 bundle.tar piece.)
i=1
for f in "$C"/piece.*; do
  mkdir -p "$C/p$i" && mv "$f" "$C/p$i/bundle.$(printf %02d $i)"
  i=$((i + 1))
done
(cd "$C" && sha256sum bundle.tar | cut -d' ' -f1 > bundle.sha256 && cp bundle.sha256 p1/)
rm -f "$C/bundle.tar"
n=$((i - 1))
echo "prepare: ok: $n pieces (.carry/p1 .. .carry/p$n)"; du -sh "$C"/p[0-9]*
