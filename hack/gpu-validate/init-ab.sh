#!/usr/bin/env bash
# Process CUDA init with and without the interceptor, and where the
# interceptor's part of it goes. Run from the repository root on the GPU
# machine after hack/gpu-validate-memory.sh's build steps:
#   hack/gpu-validate/init-ab.sh [OTHER_LIB]
# Interleaves `bench init` (main() to a context with one allocation) bare,
# preloaded with build-gpu/libtessera-cuda.so and, if given, preloaded with
# OTHER_LIB (e.g. an earlier build), ROUNDS times each (cap 40 GiB, a fresh
# shared region each run, as a new container's first process sees it), and
# prints medians. Then one run at LIBCUDA_LOG_LEVEL=3 prints the
# interceptor's `timing:` lines (cuInit, region attach, NVML start-up on its
# helper thread, NVML readings around the first context).
#
# PIDNS=1: every preloaded run starts in a new pid namespace (`unshare
# --pid --fork --mount-proc`, needs root), as in a pod; bare runs stay on
# the host. The LIB runs then get TESSERA_PID_SOCKET=$PID_SOCKET (start
# hack/gpu-validate/pid-server.py on it first, in the host namespace); the
# OTHER runs do not, so passing LIB again as OTHER compares the host-pid
# path with the card-wide one.
set -uo pipefail
PIDNS=${PIDNS:-}
PID_SOCKET=${PID_SOCKET:-}
LIB=${LIB:-$PWD/build-gpu/libtessera-cuda.so}
OTHER=${1:-}
ROUNDS=${ROUNDS:-25}
WORK=$(mktemp -d)
nvcc -O2 -arch=native -o "$WORK/bench" hack/gpu-validate/bench.cu -lcuda || exit 1
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
field() { sed -n "s/.*init_ms=\([0-9.]*\).*/\1/p"; }
wrap() { if [ -n "$PIDNS" ]; then unshare --pid --fork --mount-proc "$@"; else "$@"; fi; }
run_with() { # run_with <lib or ""> [pid socket]
    if [ -z "$1" ]; then "$WORK/bench" init; else
        wrap env LD_PRELOAD="$1" CUDA_DEVICE_MEMORY_LIMIT=40g ${2:+TESSERA_PID_SOCKET=$2} \
            CUDA_DEVICE_MEMORY_SHARED_CACHE="$WORK/r$RANDOM$RANDOM.cache" "$WORK/bench" init; fi
}
"$WORK/bench" init > /dev/null # warm the driver's caches once
for i in $(seq "$ROUNDS"); do
    run_with "" | field >> "$WORK/bare"
    run_with "$LIB" "$PID_SOCKET" | field >> "$WORK/new"
    [ -n "$OTHER" ] && run_with "$OTHER" | field >> "$WORK/other"
done
b=$(median < "$WORK/bare"); n=$(median < "$WORK/new")
printf "init_ms (median of %s)   bare %s   preloaded %s (%+.2f ms)\n" "$ROUNDS" "$b" "$n" "$(awk -v a="$n" -v b="$b" 'BEGIN{print a-b}')"
if [ -n "$OTHER" ]; then
    o=$(median < "$WORK/other")
    printf "init_ms (median of %s)   preloaded with %s: %s (%+.2f ms)\n" "$ROUNDS" "$(basename "$OTHER")" "$o" "$(awk -v a="$o" -v b="$b" 'BEGIN{print a-b}')"
fi
echo "samples bare[$(paste -sd' ' "$WORK/bare")]"
echo "samples new[$(paste -sd' ' "$WORK/new")]"
[ -n "$OTHER" ] && echo "samples other[$(paste -sd' ' "$WORK/other")]"
echo "== interceptor timing lines (LIBCUDA_LOG_LEVEL=3), three runs"
for i in 1 2 3; do
    wrap env LIBCUDA_LOG_LEVEL=3 LD_PRELOAD="$LIB" CUDA_DEVICE_MEMORY_LIMIT=40g ${PID_SOCKET:+TESSERA_PID_SOCKET=$PID_SOCKET} \
        CUDA_DEVICE_MEMORY_SHARED_CACHE="$WORK/t$i.cache" "$WORK/bench" init 2>&1 | grep -E "timing|init_ms|charged|host pid"
done
