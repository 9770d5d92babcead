#!/usr/bin/env bash
# pdkv beside LMCache (0.5.3: prepare_lmcache.sh says why not 0.5.6) on the GPU machine (issue
# 19), after the carry calls (README.md here: .carry/p1..p5 and .carry/p6 copied to /tmp/carry).
# Sets up vLLM and LMCache, makes the
# Llama-3-8B-shaped model with seeded random weights (std $INIT_STD, default 0.2: decisive logits,
# so equal answers mean something; 16 GB under /tmp, kept for a later call), then:
#   ttft: `pd bench ttft --device cuda`: cold vs warm TTFT of prefix reuse at 2048, 8192 and the
#         longest tokens the model allows (16360), 2 prompts each, modes pdkv (store on local disk),
#         lmcache_disk, lmcache_cpu, pdkv_dram (TTFT_MODES), each started and stopped in turn, eager
#         (--enforce-eager: a start takes about 40 s instead of 60-90 s; TTFT is the prefill's);
#         TTFT_MODES may name any of pdkv, pdkv_dram, lmcache_disk, lmcache_cpu (LMCache's in-process
#         connector: wrong KV on vLLM 0.26, LMCache issue 4463), lmcache_mp_disk, lmcache_mp_cpu
#         (LMCache's multi-process mode: its server beside the vLLM instance, launch/bench/lmcache_mp.py);
#   pd:   `pd bench serve --device cuda --modes pd,lmcache_pd,nixl`: P/D one request at a time and
#         under load (24 requests, half of 8000 tokens), eager, both instances of a mode on GPU 0
#         with 10 GiB of KV cache each (lmcache_pd: a 6 GiB pd_buffer in each; 8000 tokens = 1 GiB);
#   all:  both, the first with 60% of the time left.
# Time cap: DEADLINE (epoch seconds; default 500 s after the start): a mode that would not finish
# before it is not started, and each run is interrupted (SIGINT: its deployments are stopped)
# at it. One part fits one device call (about 7-8 minutes with set-up and model).
#
#   OUT=/some/dir bash scripts/gpu/lmcache.sh [ttft|pd|all]
#   env: DEADLINE, INIT_STD, MODEL, TTFT_MODES, LENGTHS, PROMPTS, PD_MODES, READ_THREADS and IO_THREADS
#        (ttft: pdkv's connector.store.read_threads, default 4, and connector.io_threads, default 2),
#        LMCACHE_L2 (ttft, lmcache_mp_disk: the MP server's disk adapter, fs_native or fs; default
#        fs_native), VLLM_BENCH (ttft: after each
#        mode's prompts, seed 004's `vllm bench serve` workflow with N random 8192-token prompts, 128
#        output tokens, the run's --seed, run twice: cold then warm)
#
# Results in $OUT (7 files at most): setup.log, run.log, ttft_gpu.json/.md, serve_lmcache.json/.md,
# instance_logs.txt (each instance log's tail, the LMCache MP server's included, and the LMCache YAML
# files).
set -u
cd "$(dirname "$0")/../.."
part=${1:-ttft}
case "$part" in ttft|pd|all) ;; *) echo "usage: lmcache.sh [ttft|pd|all]"; exit 2 ;; esac
OUT=${OUT:-/tmp/lmcache-out}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-$(( $(date +%s) + 500 ))}
SECONDS=0
left() { echo $(( DEADLINE - $(date +%s) )); }
# `pd ...` with SIGINT handled even if this shell was started with it ignored (Python then keeps it
# ignored): timeout's SIGINT must reach the run so that it stops its deployments (KeyboardInterrupt).
PD='import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)
from launch.cli import main; sys.exit(main(sys.argv[1:]))'
# The seconds until epoch $1 less $2, if at least 30 (else 0: too little to start a run).
until_() { local s=$(( $1 - $(date +%s) - $2 )); [ "$s" -ge 30 ] && echo "$s" || echo 0; }
{ bash scripts/gpu/setup.sh && bash scripts/gpu/setup_lmcache.sh; } > "$OUT/setup.log" 2>&1 ||
  { tail -40 "$OUT/setup.log"; exit 1; }
grep -E "^setup(_lmcache)?: (python|lmcache|ok|WARNING)" "$OUT/setup.log"
. /tmp/pdkv-gpu.env
INIT_STD=${INIT_STD:-0.2}
M=${MODEL:-/tmp/m8r-std$INIT_STD}
if [ ! -f "$M/model.safetensors.index.json" ]; then
  python3 -m launch.cli make-model "$M" --shape llama3-8b --weights random --init-std "$INIT_STD" >> "$OUT/setup.log" 2>&1 ||
    { tail -20 "$OUT/setup.log"; exit 1; }
fi
echo "lmcache: model $M ready (${SECONDS}s, $(left) s left)"
rc=0
if [ "$part" != pd ]; then
  end=$DEADLINE
  [ "$part" = all ] && end=$(( $(date +%s) + $(left) * 6 / 10 ))
  t=$(until_ "$end" 0)
  [ "$t" -gt 0 ] || { echo "lmcache: no time left for ttft"; exit 1; }
  timeout -s INT -k 30 "$t" python3 -c "$PD" bench ttft --device cuda --model "$M" \
    --modes "${TTFT_MODES:-pdkv,lmcache_disk,lmcache_cpu,pdkv_dram}" --lengths "${LENGTHS:-2048,8192,max}" \
    --prompts "${PROMPTS:-2}" --deadline "$end" --mode-budget-s 90 --out "$OUT/ttft_gpu.json" \
    --read-threads "${READ_THREADS:-4}" --io-threads "${IO_THREADS:-2}" --lmcache-l2 "${LMCACHE_L2:-fs_native}" \
    ${VLLM_BENCH:+--vllm-bench "$VLLM_BENCH" --tokens 8192 --output-tokens 128} >> "$OUT/run.log" 2>&1
  rc=$?
  echo "lmcache: ttft rc $rc (${SECONDS}s)"
  cat "$OUT/ttft_gpu.md" 2>/dev/null || tail -30 "$OUT/run.log"
fi
if [ "$part" != ttft ]; then
  t=$(until_ "$DEADLINE" 15)
  [ "$t" -gt 0 ] || { echo "lmcache: no time left for the P/D run"; exit 1; }
  timeout -s INT -k 30 "$t" python3 -c "$PD" bench serve --device cuda --model "$M" \
    --load-format auto --modes "${PD_MODES:-pd,lmcache_pd,nixl}" --requests 24 --rate 2 --long-fraction 0.5 \
    --long-tokens 8000 --short-tokens 256 --max-tokens 64 --sequential 8 --kv-cache-gb 10 --max-model-len 10240 \
    --lmcache-pd-buffer-gb 6 --prefill-probe 0 --enforce-eager --slo-ttft-ms 2000 --slo-tpot-ms 50 --seed 0 \
    --out "$OUT/serve_lmcache.json" >> "$OUT/run.log" 2>&1
  r=$?
  [ "$rc" = 0 ] && rc=$r
  echo "lmcache: serve rc $r (${SECONDS}s)"
  tail -c 6000 "$OUT/serve_lmcache.md" 2>/dev/null || tail -30 "$OUT/run.log"
fi
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
dirs = []
for name in ("ttft_gpu.json", "serve_lmcache.json"):
    try:
        modes = json.loads((out / name).read_text())["modes"]
    except (OSError, ValueError, KeyError):
        continue
    dirs += [(m, Path(r["run_dir"])) for m, r in modes.items() if r.get("run_dir")]
from launch.bench.lmcache_pd import conf_dir
dirs.append(("lmcache_pd", conf_dir(8000)))
with open(out / "instance_logs.txt", "w") as f:
    for mode, d in dirs:
        for p in sorted(d.glob("*.log")) + sorted(d.glob("*.yaml")):
            lines = p.read_text(errors="replace").splitlines()
            f.write(f"==== {mode}: {p} (last 80 of {len(lines)} lines)\n" + "\n".join(lines[-80:]) + "\n")
PY
echo "lmcache: done, rc $rc (${SECONDS}s)"
exit "$rc"
