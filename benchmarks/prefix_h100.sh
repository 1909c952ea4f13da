#!/usr/bin/env bash
# Issue 12's benchmarks on one GPU: prefix caching on against off, in the same run,
# Llama-3-8B shape (random bf16 weights). Two parts, each a few minutes on an H100:
#
#   prefix_h100.sh serve OUT [TAG]    multi-turn chat through `vtensor serve`, SGLang's
#       bench_multiturn shape: 256 clients x 5 rounds, 512-token questions, 64-token
#       answers, the whole history re-sent each round; all clients at once (rate inf,
#       128 requests in flight), so the throughput is the server's, not the arrival
#       rate's. One server with the cache, then one without; `bench compare` prints the
#       ratios (goals: >= 3x requests/s, >= 5x lower TTFT p50 from round 2 on).
#   prefix_h100.sh spill OUT [TAG]    issue 14: the same multi-turn run with the cache on,
#       with prefix-cache spill to the host tier (--swap-space SPILL_GIB, default 48)
#       against without: evicted blocks come back as host hits instead of recomputed.
#       The servers' /metrics after each run give GPU and host hits apart.
#   prefix_h100.sh offline OUT [TAG]  `vtensor bench offline --compare-prefix-caching`
#       (one engine, off then on, each from an empty cache after a warm-up): a 4096-token
#       system prompt shared by every request (the gain and the hit rate), then the
#       zero-hit random workload, 4 pairs in ABBA order (goal: the cache costs < 1%).
#
# Everything lands in OUT (JSON, plots, the printed tables, server logs).
#
# Capacity note: by round 5 the 256 conversations' histories are ~2,900 tokens each,
# ~740k tokens (~90 GiB of KV), more than an H100's pool after the weights, and the
# clients come back round-robin, each after every other one: least-recently-used
# eviction's worst case. The per-round table's "cached %" shows where it bites.
set -euo pipefail
usage="usage: prefix_h100.sh serve|spill|spill-only|offline OUT_DIR [TAG]"
part=${1:?$usage}
out=${2:?$usage}
tag=${3:-h100_$(date -u +%Y-%m-%d)}
port=${PORT:-8300}
clients=${CLIENTS:-256}  # the shape; CLIENTS=128 halves the histories to cache
# SERVE_FLAGS: extra `vtensor serve` flags for both servers (e.g. --admit-after-premap)
concurrency=${CONCURRENCY:-128}
mkdir -p "$out"
vt() { python3 -m vtensor.cli "$@"; }

serve_one() {  # $1: a name (on|off|spill|nospill); the cache is off only for "off"; $2..: flags
    local name=$1 flag=--enable-prefix-caching
    shift
    [ "$name" = off ] && flag=--no-enable-prefix-caching
    # Not through vt(): $! must be the server's own pid, for the SIGINT that stops it.
    # shellcheck disable=SC2086  # SERVE_FLAGS: extra flags, split on purpose
    python3 -m vtensor.cli serve --shape llama3-8b --max-model-len 4096 --port "$port" "$flag" \
        ${SERVE_FLAGS:-} "$@" --log-level warning >"$out/server_${name}_$tag.log" 2>&1 &
    server=$!  # global: the EXIT trap reads it
    local t0=$SECONDS
    trap 'kill -INT $server 2>/dev/null || true' EXIT
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
        kill -0 $server || { cat "$out/server_${name}_$tag.log"; exit 1; }
        sleep 1
    done
    echo "server ($name) up after $((SECONDS - t0))s"
    vt bench serve --base-url "http://127.0.0.1:$port" --dataset multiturn --num-clients "$clients" \
        --num-rounds 5 --question-len 512 --answer-len 64 --vocab-size 128000 \
        --request-rate inf --max-concurrency "$concurrency" \
        --label "multiturn $clients clients x 5 rounds, llama3-8b shape, $name" \
        --json "$out/multiturn_${name}_$tag.json" --plot "$out/multiturn_${name}_$tag.png" \
        2>"$out/bench_multiturn_${name}_$tag.err"
    curl -s "http://127.0.0.1:$port/metrics" >"$out/metrics_after_${name}_$tag.txt"
    kill -INT $server
    trap - EXIT
    wait $server && echo "server ($name) exited cleanly"
}

offline() {  # $1: name, then bench offline's workload flags
    local name=$1
    shift
    vt bench offline --shape llama3-8b "$@" --decode-batches 1 --decode-steps 4 \
        --no-decode-sync --no-hf-peer --json "$out/offline_${name}_$tag.json"
}

case $part in
serve)
    { serve_one on; serve_one off; } | tee "$out/multiturn_$tag.txt"
    vt bench compare "$out/multiturn_on_$tag.json" "$out/multiturn_off_$tag.json" \
        --json "$out/multiturn_compare_$tag.json" | tee "$out/multiturn_compare_$tag.txt"
    ;;
spill)
    { serve_one spill --swap-space "${SPILL_GIB:-48}"; serve_one nospill; } \
        | tee "$out/multiturn_spill_$tag.txt"
    vt bench compare "$out/multiturn_spill_$tag.json" "$out/multiturn_nospill_$tag.json" \
        --json "$out/multiturn_spill_compare_$tag.json" | tee "$out/multiturn_spill_compare_$tag.txt"
    grep -E "^vtensor_prefix_cache_(gpu|host)_hits_total|^vtensor_prefix_cache_spilled" \
        "$out"/metrics_after_*spill_"$tag".txt || true
    ;;
spill-only)  # the spill server alone (a diagnostic run: its /metrics and round table)
    serve_one spill --swap-space "${SPILL_GIB:-48}" | tee "$out/multiturn_spillonly_$tag.txt"
    ;;
offline)
    {
        offline shared_prefix --num-prompts 300 --prefix-len 4096 --input-len 256 \
            --output-len 128 --compare-prefix-caching
        offline zero_hit --num-prompts 500 --input-len 1024 --output-len 128 \
            --compare-prefix-caching 4
    } | tee "$out/offline_$tag.txt"
    ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac
