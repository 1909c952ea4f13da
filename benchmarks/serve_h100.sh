#!/usr/bin/env bash
# The serving benchmark of issue 5 on one GPU: `vtensor serve` with the Llama-3-8B shape
# (random weights), then `vtensor bench serve`: the random workload (1024 in, 128 out) at
# three request rates, and the multi-turn workload. Writes JSON, plots and logs to $1.
set -euo pipefail
out=${1:?usage: serve_h100.sh OUT_DIR [TAG]}
tag=${2:-h100_$(date -u +%Y-%m-%d)}
port=${PORT:-8300}
mkdir -p "$out"

python3 -m vtensor.cli serve ${MODEL_ARGS---shape llama3-8b} --max-model-len ${MAX_LEN:-4096} --port "$port" \
    --log-level warning >"$out/server_$tag.log" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 $server || { cat "$out/server_$tag.log"; exit 1; }
    sleep 1
done
echo "server up after ${SECONDS}s"
url=http://127.0.0.1:$port

python3 -m vtensor.cli bench serve --base-url "$url" --dataset random --num-prompts "${NUM_PROMPTS:-300}" \
    --input-len "${INPUT_LEN:-1024}" --output-len "${OUTPUT_LEN:-128}" --vocab-size "${VOCAB:-128000}" --request-rate "${RATES:-4,8,16}" \
    --label "random 1024/128, llama3-8b shape" \
    --json "$out/serve_random_llama3-8b_$tag.json" --plot "$out/serve_random_llama3-8b_$tag.png"

python3 -m vtensor.cli bench serve --base-url "$url" --dataset multiturn --num-clients "${CLIENTS:-256}" \
    --num-rounds 5 --question-len "${QUESTION_LEN:-512}" --answer-len "${ANSWER_LEN:-64}" --vocab-size "${VOCAB:-128000}" --request-rate 16 \
    --max-concurrency 128 --label "multiturn 256 clients x 5 rounds, llama3-8b shape" \
    --json "$out/serve_multiturn_llama3-8b_$tag.json" --plot "$out/serve_multiturn_llama3-8b_$tag.png"

curl -s "$url/metrics" >"$out/metrics_after_$tag.txt"
kill -INT $server
trap - EXIT
wait $server && echo "server exited cleanly"
