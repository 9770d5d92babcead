#!/usr/bin/env bash
# The GPU benchmark (issue 7 item 5), ON the GPU machine, after the pieces are in /tmp/carry
# (scripts/gpu/README.md): set up, make the Llama-3-8B-shaped model, then `pd bench serve --device
# cuda` runs pdkv P/D, colocated and vLLM's NixlConnector one after the other on the same GPUs and
# one seeded workload (8000-token prompts among 256-token ones; 8 requests one at a time, then 48
# under Poisson arrivals), checks the answers match and prints TTFT/TPOT/ITL percentiles,
# throughput, goodput at the SLOs and pdkv's KV transfer time as a share of TTFT.
#
#   OUT=/some/dir bash scripts/gpu/bench.sh [more `pd bench serve` flags, which override these]
#   WEIGHTS=random ...   # real seeded random weights (16 GB under /tmp) instead of --load-format dummy
#
# Results: $OUT/bench_gpu.json, $OUT/bench_gpu.md (the tables), $OUT/bench.log, the pd decode log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
SECONDS=0
bash scripts/gpu/setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
tail -5 "$OUT/setup.log"
. /tmp/pdkv-gpu.env
M=${MODEL:-/tmp/m8b}
WEIGHTS=${WEIGHTS:-none}
if [ "$WEIGHTS" = random ]; then M=${MODEL:-/tmp/m8b-random}; FORMAT=auto; else FORMAT=dummy; fi
STAGES=${STAGES:-prep,serve}  # two device calls (each at most 10 min): STAGES=prep, then STAGES=serve
if [[ $STAGES == *prep* ]]; then
  # The KV path alone: gather/scatter and gather -> shm slot (CUDA-registered) -> scatter, beside
  # plain pinned copies; the layouts' CUDA round trips.
  timeout 240 python3 -m launch.cli bench kv --device cuda --cache-gb 4 --block-sizes 32 \
    --chunk-tokens 256,1024,2048,4096 --iters 10 2>&1 | tee "$OUT/bench_kv.log"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_kv_layout.py 2>&1 | tail -3 | tee -a "$OUT/bench_kv.log"
  [ -f "$M/config.json" ] || python3 -m launch.cli make-model "$M" --shape llama3-8b --weights "$WEIGHTS"
  echo "bench: model $M ready (${SECONDS}s)"
fi
[[ $STAGES == *serve* ]] || exit 0
python3 -m launch.cli bench serve --device cuda --model "$M" --load-format "$FORMAT" --modes pd,colocated,nixl \
  --requests 48 --rate 2 --long-fraction 0.25 --long-tokens 8000 --short-tokens 256 --max-tokens 128 \
  --sequential 8 --slo-ttft-ms 2000 --slo-tpot-ms 50 --max-model-len 10240 --seed 0 \
  --out "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
python3 - "$OUT" <<'PY'
import json, shutil, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    run = json.loads((out / "bench_gpu.json").read_text())["modes"]["pd"]["run_dir"]
    shutil.copy(Path(run) / "decode-0.log", out / "pd-decode-0.log")
except Exception as e:  # noqa: BLE001
    print(f"bench: no pd decode log: {e}")
PY
echo "bench: done, rc $rc (${SECONDS}s)"
exit "$rc"
