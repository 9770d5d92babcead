#!/usr/bin/env bash
# Smoke test ON the GPU machine, after the pieces are in /tmp/carry (scripts/gpu/README.md):
# set up, make the dummy Llama-3-8B-shaped model, start three deployments side by side with
# `pd launch` (pdkv 1P1D; one colocated instance; a NixlConnector pair), send short and ~2k-token
# prompts to each, compare the answers, and show the decode connector's load lines.
#
#   OUT=/some/dir bash scripts/gpu/smoke.sh      # logs and smoke.json go to $OUT (at most 8 files)
#
# With 2+ GPUs: prefill (and the colocated instance, and nixl's prefill) on GPU 0, decode (and
# nixl's decode) on GPU 1; with one GPU everything on GPU 0 and no nixl pair (memory).
# PREFILL_TP=2 / DECODE_TP=2 (2 GPUs): that pool's instance spans GPUs 0,1 (tensor parallel, its
# ranks share the GPUs with the other instances) and the colocated reference runs at the decode's
# TP size; no nixl pair then.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/smoke-out}
mkdir -p "$OUT"
SECONDS=0
bash scripts/gpu/setup.sh 2>&1 | tee "$OUT/setup.log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
. /tmp/pdkv-gpu.env
N=$(nvidia-smi -L | grep -c '^GPU')
echo "smoke: $N GPU(s); $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
M=${MODEL:-/tmp/m8b}
[ -f "$M/config.json" ] || python3 -m launch.cli make-model "$M" --shape llama3-8b --no-weights
echo "smoke: model ready (${SECONDS}s)"
if [ "$N" -ge 2 ]; then D=1; NIXL=1; UTIL=0.28; KV=16; else D=0; NIXL=0; UTIL=0.3; KV=12; fi
# One GPU under 100 GiB (an H100): three 8B instances at 12 GiB of KV each do not fit (seen: the
# colocated one out of memory at start); 6 GiB each does.
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
[ "$N" -lt 2 ] && [ "${MEM:-0}" -lt 100000 ] && KV=6
PTP=${PREFILL_TP:-1}; DTP=${DECODE_TP:-1}; P=0; CO=0
[ "$PTP" = 2 ] && P=0,1
[ "$DTP" = 2 ] && D=0,1 && CO=0,1
[ "$PTP$DTP" = 11 ] || NIXL=0

common() {  # the vllm section every deployment shares
  cat <<EOF
model: $M
served_model_name: m8b
vllm:
  device: cuda
  load_format: dummy
  max_model_len: 4096
  kv_cache_memory_gb: $KV
  gpu_memory_utilization: $UTIL
  max_num_seqs: 16
EOF
}
{ common; cat <<EOF
run_dir: /tmp/run-pd
prefill: {gpus: "$P", port_base: 8100, tp: $PTP}
decode: {gpus: "$D", port_base: 8200, tp: $DTP}
proxy: {port: 8000}
connector: {chunk_size: 1024, transport: {name: smoke}}
EOF
} > /tmp/pd.yaml
{ common; cat <<EOF
run_dir: /tmp/run-co
mode: colocated
prefill: {count: 1, gpus: "$CO", port_base: 8300, tp: $DTP}
decode: {count: 0}
proxy: {port: 8001}
EOF
} > /tmp/co.yaml
KVX='["--kv-transfer-config", "{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_both\",\"kv_buffer_device\":\"cuda\"}"]'
{ common; cat <<EOF
run_dir: /tmp/run-nixl
mode: colocated
prefill: {count: 1, gpus: "0", port_base: 8400, extra_args: $KVX, env: ["VLLM_NIXL_SIDE_CHANNEL_PORT=5600"]}
decode: {count: 1, gpus: "$D", port_base: 8500, extra_args: $KVX, env: ["VLLM_NIXL_SIDE_CHANNEL_PORT=5601"]}
proxy: {port: 8002}
EOF
} > /tmp/nixl.yaml

names="pd co"; [ "$NIXL" = 1 ] && names="pd co nixl"
declare -A PID
for n in $names; do
  python3 -m launch.cli launch --config /tmp/$n.yaml --dry-run > /tmp/dry-$n.txt 2>&1 || { cat /tmp/dry-$n.txt; exit 1; }
  python3 -m launch.cli launch --config /tmp/$n.yaml > /tmp/launch-$n.log 2>&1 &
  PID[$n]=$!
done
cat /tmp/dry-pd.txt
ready=""
for _ in $(seq 1 ${READY_TIMEOUT_S:-420}); do
  ready=""
  for n in $names; do
    grep -q "pdkv ready" /tmp/launch-$n.log && ready="$ready $n"
    if ! kill -0 "${PID[$n]}" 2> /dev/null; then
      echo "smoke: launcher $n exited"; tail -40 /tmp/launch-$n.log; names=$(echo " $names " | sed "s/ $n / /")
    fi
  done
  [ "$(echo $ready | wc -w)" = "$(echo $names | wc -w)" ] && break
  sleep 1
done
echo "smoke: ready:$ready (${SECONDS}s)"
ARGS=(--pd http://127.0.0.1:8000 --colocated http://127.0.0.1:8001 --model m8b --out "$OUT/smoke.json")
[ "$NIXL" = 1 ] && case " $ready " in *" nixl "*) ARGS+=(--nixl http://127.0.0.1:8400,http://127.0.0.1:8500);; esac
if [[ " $ready " == *" pd "* && " $ready " == *" co "* ]]; then
  timeout 240 python3 scripts/gpu/smoke_requests.py "${ARGS[@]}"
fi
echo "smoke: requests done (${SECONDS}s)"
echo "--- decode connector: loaded lines"; grep -i "loaded" /tmp/run-pd/decode-0.log | tail -12
for n in $names; do kill -TERM "${PID[$n]}" 2> /dev/null; done
for n in $names; do wait "${PID[$n]}" 2> /dev/null; done
{
  for n in $names; do echo "===== launch-$n.log"; tail -30 /tmp/launch-$n.log; done
  for f in /tmp/run-pd/*.log /tmp/run-co/*.log /tmp/run-nixl/*.log; do
    [ -f "$f" ] || continue
    echo "===== $f (errors, warnings, loads, KV cache)"
    grep -E "ERROR|Error|WARN|loaded|KV cache|Maximum concurrency|backend|Traceback|nixl|NIXL|UCX" "$f" | tail -60
    echo "----- tail"; tail -15 "$f"
  done
} > "$OUT/logs.txt" 2>&1
cp /tmp/run-pd/decode-0.log "$OUT/decode-0.log" 2> /dev/null
cp /tmp/run-pd/prefill-0.log "$OUT/prefill-0.log" 2> /dev/null
echo "smoke: done (${SECONDS}s)"
