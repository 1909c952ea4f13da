#!/usr/bin/env bash
# Issue 18's soak: 10,000 streamed requests at concurrency 64 against `vtensor serve`,
# 20% of them disconnecting mid-stream. Afterwards `--check-metrics` reads /metrics and
# fails unless nothing was lost and no KV is live; then SIGINT must shut the server down
# cleanly. Exit 0 only if both hold. Writes the table, JSON, /metrics and the server log
# to $1. Defaults: the Llama-3-8B shape on the GPU; on the CPU, for instance:
#   MODEL_ARGS="--device cpu" MAX_LEN=2048 VOCAB=480 INPUT_LEN=64 OUTPUT_LEN=32 \
#       benchmarks/soak.sh OUT cpu_$(date -u +%Y-%m-%d)
set -euo pipefail
out=${1:?usage: soak.sh OUT_DIR [TAG]}
tag=${2:-h100_$(date -u +%Y-%m-%d)}
port=${PORT:-8301}
mkdir -p "$out"

# shellcheck disable=SC2086  # MODEL_ARGS is a list of arguments
python3 -m vtensor.cli serve ${MODEL_ARGS---shape llama3-8b} --max-model-len "${MAX_LEN:-4096}" \
    --port "$port" --log-level warning >"$out/soak_server_$tag.log" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 $server || { cat "$out/soak_server_$tag.log"; exit 1; }
    sleep 1
done
echo "server up after ${SECONDS}s"
url=http://127.0.0.1:$port

bench_rc=0
python3 -m vtensor.cli bench serve --base-url "$url" --dataset random \
    --num-prompts "${NUM_PROMPTS:-10000}" --input-len "${INPUT_LEN:-256}" \
    --output-len "${OUTPUT_LEN:-64}" --range-ratio 0.5 --vocab-size "${VOCAB:-128000}" \
    --max-concurrency "${CONCURRENCY:-64}" --abort-fraction "${ABORT:-0.2}" \
    --check-metrics --seed 0 --label "soak $tag" \
    --json "$out/soak_$tag.json" >"$out/soak_$tag.txt" 2>"$out/soak_bench_$tag.err" || bench_rc=$?
cat "$out/soak_$tag.txt"
grep -v "requests:" "$out/soak_bench_$tag.err" || true

curl -s "$url/metrics" >"$out/soak_metrics_after_$tag.txt"
kill -INT $server
trap - EXIT
server_rc=0
wait $server || server_rc=$?
tail -n 3 "$out/soak_server_$tag.log"
echo "bench exit $bench_rc (1: a request failed or the metrics check failed); server exit $server_rc"
[ "$bench_rc" -eq 0 ] && [ "$server_rc" -eq 0 ]
