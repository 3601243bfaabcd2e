#!/usr/bin/env bash
# Validates the interceptor's SM limits and priorities on a real GPU, all
# cases in one run, table at the end.
#
# Build the library on a machine with the Rust toolchain (build-gpu/ is
# git-ignored):
#   cargo build --release -p tessera-interceptor
#   mkdir -p build-gpu/sm && cp target/release/libtessera_cuda.so build-gpu/sm/libtessera-cuda.so
# then run this from the repository root on the GPU machine (nvcc,
# nvidia-smi). Full logs go to $OUT (or a temp dir).
#
# Each "container" gets its own shared region; all share one card tenant
# directory, as the node agent mounts it. Cases: a solo run without the
# interceptor (the card's full rate); two tenants at once with caps 30/70,
# 50/50, 10/90 (default policy); one tenant alone at 30 with `force` and
# with the default policy; priority (a low-priority tenant before, during
# and after a high-priority one); launch overhead with no cap vs no preload.
# Work share = kernels/s over the solo rate; NVML share = mean per-process
# SM% from `nvidia-smi pmon`, both over the run after SETTLE seconds.
set -uo pipefail

LIB=${LIB:-$PWD/build-gpu/sm/libtessera-cuda.so}
AGG=${AGG:-$PWD/build-gpu/aggregate-tables}
RUN=${RUN:-12}
SETTLE=${SETTLE:-4}
WORK=$(mktemp -d)
LOGDIR=${OUT:-$WORK}
exec > >(tee "$LOGDIR/sm-validate.log") 2>&1
test -f "$LIB" || { echo "missing $LIB (see the header of this script)"; exit 1; }
test -x "$AGG" || { echo "missing $AGG (see the header of this script)"; exit 1; }
mkdir -p "$WORK/cards" "$WORK/tenants"
: > "$WORK/tenants.txt"
# The card the tenants run on: CUDA ordinal 0 in PCI order = nvidia-smi's 0.
export CUDA_DEVICE_ORDER=PCI_BUS_ID
UUID=$(nvidia-smi --query-gpu=uuid --format=csv,noheader -i 0)
"$AGG" --cards-dir "$WORK/cards" --card "$UUID" --tenants "$WORK/tenants.txt" 2> "$LOGDIR/aggregate-tables.log" &
AGG_PID=$!
trap 'kill $AGG_PID 2>/dev/null' EXIT

echo "== machine"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nvcc -O2 -arch=native -o "$WORK/sm_load" hack/gpu-validate/sm_load.cu || exit 1
nvcc -O2 -arch=native -o "$WORK/bench" hack/gpu-validate/bench.cu -lcuda || exit 1

tenant() { # tenant <name> <env...> -- <command...>
    local name=$1; shift
    local envs=() prio=-
    while [ "$1" != -- ]; do
        case $1 in CUDA_TASK_PRIORITY=*) prio=${1#*=} ;; esac
        envs+=("$1"); shift
    done; shift
    # The "allocation": what the agent would know from the pod.
    mkdir -p "$WORK/tenants/$name"
    echo "$WORK/tenants/$name/region.cache $prio $UUID" >> "$WORK/tenants.txt"
    env LD_PRELOAD="$LIB" CUDA_DEVICE_MEMORY_SHARED_CACHE="$WORK/tenants/$name/region.cache" \
        TESSERA_CARD_TENANTS_DIR="$WORK/cards" TESSERA_TENANT_ID="$name" TESSERA_VISIBLE_UUIDS="$UUID" \
        LIBCUDA_LOG_LEVEL=2 "${envs[@]}" "$@"
}
# mean of windows[SETTLE..]
rate_after() { sed -n 's/.*windows=\([0-9,]*\).*/\1/p' "$1" | tr , '\n' | tail -n +$((SETTLE + 1)) |
    awk '{s+=$1; n++} END {if (n) printf "%.1f", s/n; else print 0}'; }
pid_of() { sed -n 's/.*pid=\([0-9]*\).*/\1/p' "$1"; }
# mean SM% of a pid in a pmon log, skipping the first SETTLE samples of it
nvml_sm() { awk -v p="$2" -v skip="$SETTLE" '$2==p && $4 ~ /^[0-9]+$/ {n++; if (n>skip) {s+=$4; k++}} END {if (k) printf "%.1f", s/k; else print "n/a"}' "$1"; }
pmon() { timeout "$1" nvidia-smi pmon -s u -d 1 > "$2" 2>&1 & }

echo "== solo, no interceptor: the card's full rate"
"$WORK/sm_load" 8 | tee "$WORK/solo.txt"
SOLO=$(sed -n 's/.*windows=\([0-9,]*\).*/\1/p' "$WORK/solo.txt" | tr , '\n' | tail -n +3 |
    awk '{s+=$1; n++} END {printf "%.1f", s/n}')
echo "solo rate ${SOLO}/s"

ROWS=()
pair() { # pair <capA> <capB>
    local a=$1 b=$2 tag="pair-$1-$2"
    pmon $((RUN + 3)) "$WORK/$tag.pmon"
    sleep 1
    tenant "$tag-a" CUDA_DEVICE_SM_LIMIT="$a" -- "$WORK/sm_load" "$RUN" > "$WORK/$tag-a.txt" 2> "$WORK/$tag-a.err" &
    local pa=$!
    tenant "$tag-b" CUDA_DEVICE_SM_LIMIT="$b" -- "$WORK/sm_load" "$RUN" > "$WORK/$tag-b.txt" 2> "$WORK/$tag-b.err" &
    local pb=$!
    wait $pa $pb; sleep 2
    for side in a:$a b:$b; do
        local s=${side%%:*} cap=${side#*:} f="$WORK/$tag-${side%%:*}.txt"
        cat "$f"; grep -h "SM cap" "$WORK/$tag-$s.err" | head -3
        local r; r=$(rate_after "$f")
        ROWS+=("$(printf "%-22s %5s %10s %9s %9s" "$tag tenant-$s" "$cap" "$r" \
            "$(awk -v r="$r" -v s="$SOLO" 'BEGIN {printf "%.1f", 100*r/s}')" \
            "$(nvml_sm "$WORK/$tag.pmon" "$(pid_of "$f")")")")
    done
}
echo "== two tenants, default policy"
pair 30 70
pair 50 50
pair 10 90

alone() { # alone <policy> <cap>
    local tag="alone-$1-$2"
    pmon $((RUN + 3)) "$WORK/$tag.pmon"; sleep 1
    tenant "$tag" CUDA_DEVICE_SM_LIMIT="$2" GPU_CORE_UTILIZATION_POLICY="$1" -- \
        "$WORK/sm_load" "$RUN" > "$WORK/$tag.txt" 2> "$WORK/$tag.err"
    sleep 2; cat "$WORK/$tag.txt"; grep -h "SM cap" "$WORK/$tag.err" | head -3
    local r; r=$(rate_after "$WORK/$tag.txt")
    ROWS+=("$(printf "%-22s %5s %10s %9s %9s" "$tag" "$2" "$r" \
        "$(awk -v r="$r" -v s="$SOLO" 'BEGIN {printf "%.1f", 100*r/s}')" \
        "$(nvml_sm "$WORK/$tag.pmon" "$(pid_of "$WORK/$tag.txt")")")")
}
echo "== one tenant alone"
alone force 30
alone default 30

echo "== priority: low-priority tenant (no cap) 0-16 s, high-priority 4-10 s"
tenant prio-low CUDA_TASK_PRIORITY=1 -- "$WORK/sm_load" 16 > "$WORK/prio-low.txt" 2> "$WORK/prio-low.err" &
PL=$!
sleep 4
tenant prio-high CUDA_TASK_PRIORITY=0 -- "$WORK/sm_load" 6 > "$WORK/prio-high.txt" 2> "$WORK/prio-high.err"
wait $PL
cat "$WORK/prio-low.txt" "$WORK/prio-high.txt"
PRIO=$(sed -n 's/.*windows=\([0-9,]*\).*/\1/p' "$WORK/prio-low.txt" | tr , ' ' |
    awk -v s="$SOLO" '{b=($2+$3)/2; d=($7+$8+$9)/3; r=$13; a=($14+$15+$16)/3;
        printf "low-priority kernels/s: before %.1f (%.0f%%), high busy %.1f (%.0f%%), second 12 (high stopped ~10.5) %.1f (%.0f%%), seconds 13-15 %.1f (%.0f%%)",
        b, 100*b/s, d, 100*d/s, r, 100*r/s, a, 100*a/s}')
HIGH=$(rate_after "$WORK/prio-high.txt")

echo "== launch overhead, no cap: preloaded vs bare (interleaved, medians of 7)"
for i in 1 2 3 4 5 6 7; do
    "$WORK/bench" launch 20000 | sed -n 's/.*launch_ns=\([0-9.]*\).*/\1/p' >> "$WORK/launch.bare"
    env LD_PRELOAD="$LIB" "$WORK/bench" launch 20000 | sed -n 's/.*launch_ns=\([0-9.]*\).*/\1/p' >> "$WORK/launch.pre"
    env LD_PRELOAD="$LIB" CUDA_DEVICE_SM_LIMIT=100 GPU_CORE_UTILIZATION_POLICY=force \
        "$WORK/bench" launch 20000 | sed -n 's/.*launch_ns=\([0-9.]*\).*/\1/p' >> "$WORK/launch.pre100"
done
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

for f in "$WORK"/*.txt "$WORK"/*.err "$WORK"/*.pmon; do echo "### $(basename "$f")"; cat "$f"; done > "$LOGDIR/sm-details.log"
echo
echo "== results (solo rate ${SOLO} kernels/s; shares after ${SETTLE} s of ${RUN} s)"
printf "%-22s %5s %10s %9s %9s\n" case cap kernels/s work% nvml-sm%
for r in "${ROWS[@]}"; do echo "$r"; done
echo "$PRIO"
echo "high-priority tenant: $HIGH kernels/s ($(awk -v r="$HIGH" -v s="$SOLO" 'BEGIN {printf "%.0f", 100*r/s}')% of solo)"
echo "empty-kernel launch ns (median): bare $(median < "$WORK/launch.bare")  preloaded-no-cap $(median < "$WORK/launch.pre")  preloaded-cap100 $(median < "$WORK/launch.pre100")"
echo "bare samples: $(paste -sd' ' "$WORK/launch.bare")"
echo "pre  samples: $(paste -sd' ' "$WORK/launch.pre")"
