#!/usr/bin/env bash
# Benchmarks tessera-webhook: admissions per second and p50/p99 latency over
# TLS with keep-alive, on loopback, with wrk as the load generator on the
# same machine. Bounded: DURATION (default 10s) per run.
#
#   hack/bench-webhook.sh                 # 16 connections, 1 wrk thread, 10s
#   CONNECTIONS=4 DURATION=20s hack/bench-webhook.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-16}
WRK_THREADS=${WRK_THREADS:-1}
SERVER_THREADS=${SERVER_THREADS:-2}
PORT=${PORT:-18443}

if ! command -v wrk >/dev/null 2>&1; then
    echo "wrk is not installed; install it with: apt-get install -y wrk" >&2
    exit 1
fi

cargo build --release -q -p tessera-webhook --example bench_server
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')

work=$(mktemp -d)
"$target_dir/release/examples/bench_server" --port "$PORT" --dir "$work" --threads "$SERVER_THREADS" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do
    [ -e "$work/ready" ] && break
    sleep 0.1
done
[ -e "$work/ready" ] || { echo "bench server did not start" >&2; exit 1; }

echo "== $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== body $(wc -c <"$work/review.json") bytes; $CONNECTIONS connections, $WRK_THREADS wrk thread(s), $SERVER_THREADS server threads, $DURATION"
REVIEW_FILE="$work/review.json" wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency \
    -s hack/bench-webhook.lua "https://127.0.0.1:$PORT/mutate"
