#!/usr/bin/env bash
# Host-side enforcement on a real GPU: the node agent's enforcement loop
# (node-agent/examples/enforce_gpu.rs, the same attribution, decision and
# pidfd kill as the agent, against real NVML) watches a PyTorch process that
# runs WITHOUT the interceptor (the bypass case: nothing in the process
# stops it) and grows past its cap.
#
# Build on a machine with the Rust toolchain (build-gpu/ is git-ignored):
#   cargo build --release -p tessera-node-agent --example enforce_gpu
#   mkdir -p build-gpu && cp target/release/examples/enforce_gpu build-gpu/enforce-gpu
# then run from the repository root on the GPU machine (python3 with torch).
# Figures go to stdout and, if set, $OUT/enforce.log.
#
# Cases (cap 10240 MiB per card, margin 64 MiB, period 500 ms):
# 1. kill mode, the process grows 1 GiB every 200 ms up to 40 GiB: expected
#    killed just past 10 GiB; prints what it held and the reaction time
#    (first moment NVML could show it over cap+margin -> SIGKILL);
# 2. report mode, same process: expected alive after 40 GiB, one report;
# 3. kill mode, a process that stays at 8 GiB: expected alive, no action.
# Each enforce-gpu run ends with its mean round cost on this machine.
set -uo pipefail

ENFORCE=${ENFORCE:-$PWD/build-gpu/enforce-gpu}
CAP_MIB=${CAP_MIB:-10240}
WORK=$(mktemp -d)
LOG=${OUT:-$WORK}/enforce.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
test -x "$ENFORCE" || { echo "missing $ENFORCE (see the header of this script)"; exit 1; }

cat > "$WORK/grow.py" <<'PY'
import sys, time, torch
target, hold_s = int(sys.argv[1]), float(sys.argv[2])
torch.cuda.init(); torch.empty(1, device="cuda")
held = []
for i in range(target):
    t = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); t.fill_(1)
    torch.cuda.synchronize(); held.append(t)
    print(f"held={i + 1} GiB at={time.time():.3f}", flush=True)
    time.sleep(0.2)
time.sleep(hold_s)
print(f"survived holding {len(held)} GiB", flush=True)
PY

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

run_case() { # run_case <name> <mode> <GiB to grow to> <seconds to hold>
    local name=$1 mode=$2 gib=$3 hold=$4
    echo "== $name"
    python3 "$WORK/grow.py" "$gib" "$hold" > "$WORK/$name.py.txt" 2>&1 &
    local pid=$!
    "$ENFORCE" --rule "pid:$pid=$CAP_MIB" --mode "$mode" --duration-s $((gib / 4 + ${hold%.*} + 4)) \
        > "$WORK/$name.enforce.txt" 2>&1 &
    local enforcer=$!
    wait "$pid"; local status=$?
    wait "$enforcer"
    cat "$WORK/$name.enforce.txt"
    tail -n 2 "$WORK/$name.py.txt"
    if [ "$status" -eq 137 ]; then echo "RESULT $name: process killed (SIGKILL)"; else echo "RESULT $name: process exited with $status"; fi
    # Reaction: from the first line where the process held more than
    # cap+margin in tensors alone (its context comes on top, so NVML showed
    # it over no later than that) to the kill.
    local action_at over_at
    action_at=$(sed -n 's/^ACTION kill .*rule=pid.* at=\([0-9.]*\).*/\1/p' "$WORK/$name.enforce.txt" | head -n 1)
    over_at=$(awk -v cap="$CAP_MIB" '/^held=/ { split($1, a, "="); split($3, b, "="); if (a[2] * 1024 > cap + 64) { print b[2]; exit } }' "$WORK/$name.py.txt")
    if [ -n "$action_at" ] && [ -n "$over_at" ]; then
        awk -v a="$action_at" -v o="$over_at" 'BEGIN { printf "REACTION %s: %.0f ms (tensors alone over cap+margin -> kill; <= 0 means the context pushed it over earlier)\n", "'"$name"'", (a - o) * 1000 }'
    fi
}

run_case kill-grow kill 40 2
run_case report-grow report 40 2
run_case kill-under kill 8 5
