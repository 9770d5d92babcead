# KV GPU to GPU (connector.transport.shm_memory gpu) and the first token, on the GPU machine, in two
# parts run on one warm machine (see README.md here for the carry calls before them):
#   a: setup; the GPU tests of the shm transport's GPU arenas and the KV layout; `pd bench kv`
#      (the GPU-memory row beside a plain device-to-device copy_); `pd bench serve` with modes
#      pd (chunks in the prefill's GPU memory), pd_host (in shared host memory) and colocated,
#      one request at a time and under load, dummy weights (the timing run).
#   b: a Llama-3-8B-shaped model with seeded random weights; `pd bench serve` with modes pd,
#      colocated, nixl and pd_old on it (the equality run: answers compared token for token).
#   one: for a budget of one call: the GPU tests and `pd bench kv` (shortened), then b's serving run
#      with modes pd (GPU memory), colocated and nixl and fewer requests (24 one at a time, 32 under load).
#   kernel: like one, with 40 one at a time (20 per prompt length) and modes pd and colocated
#      (MODES to change), the prefill probe on: after the one-launch Triton gather/scatter. In two
#      calls on one warm machine: STAGE=prep (setup, GPU tests, bench kv, the model), then
#      STAGE=serve (the serving run; about 5 minutes). STAGE=prep makes $MODEL (std $INIT_STD).
#   equal: greedy equality: pd make-model's small random model (4 layers, float32 weights) served in
#      float32 (--dtype float32; vLLM then picks an attention backend that takes float32), modes pd,
#      pd_after and colocated, eager, 16 one at a time (8 of 1900 tokens, 8 of 256) and 16 under
#      Poisson 4/s, 128 output tokens: answers compared token for token (about 3 minutes).
# Results go to $OUT. Usage: bash scripts/gpu/gpu_memory.sh a|b|one|kernel|equal
set -u
part=${1:?usage: gpu_memory.sh a|b|one|kernel|equal}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
bash scripts/gpu/setup.sh > "$OUT/setup_$part.log" 2>&1 || { tail -30 "$OUT/setup_$part.log"; exit 1; }
. /tmp/pdkv-gpu.env
common=(--device cuda --requests 40 --rate 4 --long-fraction 0.5 --long-tokens 8000 --short-tokens 256
        --sequential 40 --kv-cache-gb 12 --slo-ttft-ms 2000 --slo-tpot-ms 50 --max-model-len 10240 --seed 0)
stage=${STAGE:-all}
if { [ "$part" = one ] || [ "$part" = kernel ]; } && [ "$stage" != serve ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_shm_gpu.py tests/unit/test_kv_layout.py \
    > "$OUT/pytest_gpu.log" 2>&1
  tail -4 "$OUT/pytest_gpu.log"
  timeout 60 python3 -m launch.cli bench kv --device cuda --block-sizes 32 --chunk-tokens 1024,4096 --iters 10 \
    > "$OUT/bench_kv.md" 2>&1
  cat "$OUT/bench_kv.md"
  t0=$(date +%s)
  python3 -m launch.cli make-model "${MODEL:-/tmp/m8r}" --shape llama3-8b --weights random \
    --init-std "${INIT_STD:-0.02}" > "$OUT/make_model.log" 2>&1
  echo "random weights written in $(( $(date +%s) - t0 )) s"
fi
if [ "$part" = equal ]; then
  python3 -m launch.cli make-model /tmp/tiny-f32 > "$OUT/make_model_tiny.log" 2>&1 || { tail -5 "$OUT/make_model_tiny.log"; exit 1; }
  left=$(( ${DEADLINE:-$(( $(date +%s) + 300 ))} - $(date +%s) ))
  [ "$left" -ge 30 ] || { echo "equal: DEADLINE leaves $left s (< 30): not run"; exit 1; }
  timeout "$left" python3 -m launch.cli bench serve --device cuda --model /tmp/tiny-f32 --load-format auto \
    --dtype float32 --enforce-eager --modes "${MODES:-pd,pd_after,colocated}" --requests 16 --rate 4 \
    --long-fraction 0.5 --long-tokens 1900 --short-tokens 256 --max-tokens 128 --sequential 16 --kv-cache-gb 4 \
    --gpu-pool-mb 1024 --max-model-len 4096 --prefill-probe 0 --seed 0 --out "$OUT/serve_equal.json" \
    > "$OUT/serve_equal.md" 2>&1
  echo "equal rc $?"
  tail -c 5000 "$OUT/serve_equal.md"
fi
if { [ "$part" = one ] || [ "$part" = kernel ]; } && [ "$stage" != prep ]; then
  if [ -n "${BENCH_KV:-}" ]; then  # the kernel table again, in the serving call
    timeout 90 python3 -m launch.cli bench kv --device cuda --block-sizes 32 --chunk-tokens 1024,4096 --iters 20 \
      > "$OUT/bench_kv.md" 2>&1
    cat "$OUT/bench_kv.md"
  fi
  # MODEL/INIT_STD: another random-weight model (lmcache.sh's /tmp/m8r-std0.2 is then shared)
  M=${MODEL:-/tmp/m8r}
  [ -f "$M/model.safetensors.index.json" ] || python3 -m launch.cli make-model "$M" --shape llama3-8b \
    --weights random --init-std "${INIT_STD:-0.02}" > "$OUT/make_model.log" 2>&1
  seq=24; modes=${MODES:-pd,colocated,nixl}
  if [ "$part" = kernel ]; then seq=40; modes=${MODES:-pd,colocated}; fi
  common=(--device cuda --requests 32 --rate 4 --long-fraction 0.5 --long-tokens 8000 --short-tokens 256
          --sequential $seq --kv-cache-gb 12 --slo-ttft-ms 2000 --slo-tpot-ms 50 --max-model-len 10240 --seed 0)
  left=$(( ${DEADLINE:-$(( $(date +%s) + 420 ))} - $(date +%s) ))  # DEADLINE: epoch s by which to stop
  timeout "$left" python3 -m launch.cli bench serve --model "$M" --load-format auto \
    --modes "$modes" --max-tokens 128 "${common[@]}" --out "$OUT/serve_one.json" \
    > "$OUT/serve_one.md" 2>&1
  echo "serve rc $?"
  tail -c 6000 "$OUT/serve_one.md"
elif [ "$part" = a ]; then
  python3 -m pytest -q -p no:cacheprovider tests/unit/test_shm_gpu.py tests/unit/test_kv_layout.py \
    > "$OUT/pytest_gpu.log" 2>&1
  tail -4 "$OUT/pytest_gpu.log"
  python3 -m launch.cli bench kv --device cuda --block-sizes 32 --chunk-tokens 1024,2048,4096 --iters 20 \
    > "$OUT/bench_kv.md" 2>&1
  cat "$OUT/bench_kv.md"
  python3 -m launch.cli make-model /tmp/m8b --shape llama3-8b --no-weights > /dev/null
  timeout "${SERVE_TIMEOUT:-430}" python3 -m launch.cli bench serve --model /tmp/m8b --load-format dummy \
    --modes pd,pd_host,colocated --max-tokens 64 "${common[@]}" --out "$OUT/serve_a.json" > "$OUT/serve_a.md" 2>&1
  echo "serve rc $?"
  tail -c 7000 "$OUT/serve_a.md"
elif [ "$part" = b ]; then
  t0=$(date +%s)
  python3 -m launch.cli make-model /tmp/m8r --shape llama3-8b --weights random > "$OUT/make_model.log" 2>&1
  echo "random weights written in $(( $(date +%s) - t0 )) s"
  timeout "${SERVE_TIMEOUT:-480}" python3 -m launch.cli bench serve --model /tmp/m8r --load-format auto \
    --modes "${MODES:-pd,colocated,nixl,pd_old}" --max-tokens 128 "${common[@]}" --out "$OUT/serve_b.json" \
    > "$OUT/serve_b.md" 2>&1
  echo "serve rc $?"
  tail -c 7000 "$OUT/serve_b.md"
fi
