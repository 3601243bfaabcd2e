#!/usr/bin/env bash
# Scheduler benchmarks: placement-core decisions per second on 1,000 nodes
# x 8 GPUs, and bind throughput of the Kubernetes shell against the API
# stand-in (1,000 pending pods, 1,000 nodes). Prints figures; no assertions.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -q -p tessera-scheduler --bench placement
cargo bench -q -p tessera-scheduler --bench bind_throughput
