#!/usr/bin/env bash
# How much streaming hides: pdkv P/D one request at a time (8k-token prompts among 256-token ones)
# with the prefill instance's step budget (--max-num-batched-tokens) at 4096 tokens
# (the prompt's KV streams to decode over 2 steps) and at vLLM's default (one step: nothing
# streams, all 1 GiB moves after the prefill), beside colocated in the same run. ON the GPU
# machine after the pieces are in /tmp/carry (scripts/gpu/README.md); about 7 minutes. (2048: bench.sh.)
#
#   OUT=/some/dir bash scripts/gpu/streaming.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/stream-out}
mkdir -p "$OUT"
SECONDS=0
bash scripts/gpu/setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
. /tmp/pdkv-gpu.env
M=${MODEL:-/tmp/m8b-random}
[ -f "$M/config.json" ] || python3 -m launch.cli make-model "$M" --shape llama3-8b --weights random > /dev/null
echo "streaming: model ready (${SECONDS}s)"
common=(bench serve --device cuda --model "$M" --load-format auto --requests 8 --sequential 8 --rate 2
        --long-fraction 0.5 --long-tokens 8000 --short-tokens 256 --max-tokens 32 --max-model-len 10240 --seed 1)
for step in 4096 0; do
  modes=pd; [ "$step" = 4096 ] && modes=pd,colocated
  timeout 200 python3 -m launch.cli "${common[@]}" --modes "$modes" --prefill-step-tokens "$step" \
    --out "$OUT/stream_$step.json" > "$OUT/stream_$step.log" 2>&1
  echo "streaming: step $step done, rc $? (${SECONDS}s)"
  sed -n '/## sequential/,/## load/p' "$OUT/stream_$step.log"
done
rm -f "$OUT"/*.md
