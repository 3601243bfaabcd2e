#!/usr/bin/env bash
# Tries each known way past a memory cap on a real GPU and prints, for each,
# what the card really holds for the offending processes (NVML's per-process
# usage, the driver's truth) against the cap.
#
# Build the interceptor as for hack/gpu-validate-memory.sh
# (build-gpu/libtessera-cuda.so), then run from the repository root on the
# GPU machine (needs nvcc, nvidia-smi):
#   hack/gpu-validate-escapes.sh
# LIB=<other build> compares another build of the interceptor; CAP_GIB sets
# the cap (default 10). Figures go to stdout and, if set, $OUT/escapes.log.
#
# Escapes:
#   vmm        cuMemCreate -> cuMemMap -> cuMemSetAccess -> touch ->
#              cuMemRelease in a loop (2 GiB each): the mapping keeps the
#              memory after the release. The interceptor stops it.
#   tamper     one process fills to the cap, the container's accounting file
#              (CUDA_DEVICE_MEMORY_SHARED_CACHE, writable from inside) is
#              overwritten with zeros, a second process fills again. The
#              interceptor alone cannot stop this (anything a container can
#              write it can forge): the node agent's NVML-based enforcement
#              does.
#   nopreload  a process that skips the preload (static binary, cleared
#              LD_PRELOAD) allocates freely: only the node agent sees it.
#   pool       a memory pool with its release threshold raised keeps 8 GiB
#              after they are freed into it; then plain allocations.
#   graph      a graph with an 8 GiB allocation node (and its free node) is
#              launched: the driver keeps the memory for graphs; then plain
#              allocations.
#   heap       cuCtxSetLimit(CU_LIMIT_MALLOC_HEAP_SIZE, 8 GiB) and a kernel
#              that mallocs; then plain allocations.
#   lmem       a kernel with 64 KiB of local memory per thread: the driver
#              reserves local memory for every thread the card holds at once.
#   mipmap     16384x16384 float4 mipmapped arrays (4 GiB each) until refused.
#   vllm       not an escape: vLLM's sleep-mode pattern (create/map,
#              unmap+release, create/map again) must keep working under the
#              cap, with the memory shown free while asleep.
#   expandable not an escape: PyTorch with expandable_segments (cuMemCreate/
#              cuMemMap into one reserved range) fills 1 GiB tensors to the
#              cap, frees every other one plus empty_cache (unmap/release of
#              pieces), fills again: must stop at the cap both times.
#
# If build-gpu/enforce-gpu exists (a release build of the node agent's
# enforcement loop) and ENFORCE_ARGS is set, it is started with those
# arguments before the escapes, and each escape also reports whether its
# processes were gone 3 s after reaching the cap. Without it, the script
# reports held-vs-cap only.
set -uo pipefail
LIB=${LIB:-$PWD/build-gpu/libtessera-cuda.so}
CAP_GIB=${CAP_GIB:-10}
ENFORCE=${ENFORCE:-$PWD/build-gpu/enforce-gpu}
ENFORCE_ARGS=${ENFORCE_ARGS:-}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
LOG=${OUT:-$WORK}/escapes.log
exec > >(tee -a "$LOG") 2>&1
test -f "$LIB" || { echo "missing $LIB (see hack/gpu-validate-memory.sh)"; exit 1; }
nvcc -O2 -arch=native -o "$WORK/escapes" "$HERE/gpu-validate/escapes.cu" -lcuda || exit 1
CAP_MIB=$((CAP_GIB * 1024))

echo "== escapes under a ${CAP_GIB} GiB cap with $(basename "$LIB") ($(date -u +%FT%TZ))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

held_mib() { # NVML's usage of one pid, MiB
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits |
        awk -F', *' -v p="$1" '$1 == p { print $2 }'
}
PIDS=()
start() { # start <name> <command...>: background, waits for "ready" or exit
    local name=$1; shift
    "$@" > "$WORK/$name.out" 2>&1 &
    local pid=$!
    for _ in $(seq 1200); do
        grep -q ready "$WORK/$name.out" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    sed 's/^/    /' "$WORK/$name.out" | grep -v '^    ready$'
    PIDS+=("$pid")
    LAST=$pid
}
report() { # report <escape>: held by the started pids vs the cap
    local total=0 alive=0 m
    for p in "${PIDS[@]}"; do
        m=$(held_mib "$p"); total=$((total + ${m:-0}))
    done
    local verdict="within the cap"
    [ "$total" -gt "$CAP_MIB" ] && verdict="ESCAPED ($((total - CAP_MIB)) MiB over)"
    printf "%-10s held %6d MiB  cap %6d MiB  %s\n" "$1" "$total" "$CAP_MIB" "$verdict"
    if [ -n "$ENFORCER_PID" ]; then
        sleep 3
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
        echo "           after 3 s with enforce-gpu: $alive of ${#PIDS[@]} processes still alive"
    fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    PIDS=()
}
capped() { # capped <region> <command...>
    local region=$1; shift
    exec env LD_PRELOAD="$LIB" CUDA_DEVICE_MEMORY_LIMIT="${CAP_GIB}g" \
        CUDA_DEVICE_MEMORY_SHARED_CACHE="$WORK/$region.cache" "$@"
}

ENFORCER_PID=
if [ -x "$ENFORCE" ]; then
    echo "== $ENFORCE present"
    "$ENFORCE" --help 2>&1 | head -20 | sed 's/^/    /'
    if [ -n "$ENFORCE_ARGS" ]; then
        # shellcheck disable=SC2086
        "$ENFORCE" $ENFORCE_ARGS > "$WORK/enforce.log" 2>&1 &
        ENFORCER_PID=$!
        sleep 1
    fi
else
    echo "== no build-gpu/enforce-gpu: held-vs-cap only"
fi

echo "== vmm: create/map/setAccess/touch/release, 2 GiB each, until refused (at most 40)"
start vmm capped vmm "$WORK/escapes" vmm 2 40
report vmm

echo "== tamper: fill to the cap, zero the accounting file, fill again from a second process"
start tamper-a capped tamper "$WORK/escapes" fill 512 80
size=$(stat -c %s "$WORK/tamper.cache")
dd if=/dev/zero of="$WORK/tamper.cache" bs="$size" count=1 conv=notrunc status=none
echo "    zeroed $size bytes of the accounting file"
start tamper-b capped tamper "$WORK/escapes" fill 512 80
report tamper

echo "== nopreload: the cap in the environment, no LD_PRELOAD, 512 MiB chunks (at most 40)"
start nopreload env CUDA_DEVICE_MEMORY_LIMIT="${CAP_GIB}g" "$WORK/escapes" fill 512 40
report nopreload

for kind in pool graph heap; do
    echo "== $kind: 8 GiB that way, then 512 MiB cuMemAlloc chunks until refused (at most 40)"
    start "$kind" capped "$kind" "$WORK/escapes" "$kind" 8 40
    report "$kind"
done

echo "== lmem: a kernel with 64 KiB of local memory per thread, then 512 MiB chunks until refused (at most 40)"
start lmem capped lmem "$WORK/escapes" lmem 0 40
report lmem

echo "== mipmap: 16384x16384 float4 mipmapped arrays, 1 level (4 GiB each), until refused (at most 10)"
start mipmap capped mipmap "$WORK/escapes" mipmap 1 10
report mipmap

echo "== vllm sleep mode under the cap (4 x 1 GiB): must work; free shown while asleep"
start vllm capped vllm "$WORK/escapes" vllm 1 4
report vllm

echo "== expandable: PyTorch expandable_segments, 1 GiB tensors to the cap, free half, fill again"
if python3 -c 'import torch' 2>/dev/null; then
    start expandable capped expandable env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -c '
import time, torch
xs = []
def fill():
    try:
        while len(xs) < 40:
            xs.append(torch.ones(256 << 20, device="cuda"))
    except torch.OutOfMemoryError:
        pass
fill(); print("filled_gib=%d" % len(xs), flush=True)
del xs[::2]; torch.cuda.empty_cache()
print("after_free_gib=%d reserved_mib=%d" % (len(xs), torch.cuda.memory_reserved() >> 20), flush=True)
fill(); print("refilled_gib=%d" % len(xs), flush=True)
print("ready", flush=True); time.sleep(600)'
    report expandable
else
    echo "    no torch: skipped"
fi

[ -n "$ENFORCER_PID" ] && { kill "$ENFORCER_PID"; sed 's/^/    enforce: /' "$WORK/enforce.log" | tail -20; }
exit 0
