#!/usr/bin/env bash
# Validates libtessera-cuda.so (the interceptor) on a real GPU.
#
# Build it on a machine with the Rust toolchain and put it where this script
# looks (build-gpu/ is git-ignored):
#   cargo build --release -p tessera-interceptor
#   mkdir -p build-gpu && cp target/release/libtessera_cuda.so build-gpu/libtessera-cuda.so
# then run this script from the repository root on the GPU machine (needs
# nvcc, python3 with torch, nvidia-smi). Figures go to stdout and, if set,
# $OUT/validate.log.
#
# Checks: torch.cuda.mem_get_info() under a 10 GiB cap; how many 1 GiB tensors
# fit before torch.OutOfMemoryError; nvidia-smi under a 7500 MiB cap; two
# processes with 10 GiB and 20 GiB caps at once on one card; overhead against
# no preload (same binaries, interleaved runs, medians) for cuMemAlloc+cuMemFree,
# empty-kernel launch, process CUDA init and a PyTorch training step.
set -uo pipefail

LIB=${LIB:-$PWD/build-gpu/libtessera-cuda.so}
ROUNDS=${ROUNDS:-7}
TRAIN_ROUNDS=${TRAIN_ROUNDS:-3}
WORK=$(mktemp -d)
LOG=${OUT:-$WORK}/validate.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
test -f "$LIB" || { echo "missing $LIB (see the header of this script)"; exit 1; }

# Each "container" gets its own shared region, as the node agent would set.
capped() { # capped <cap> <region-name> <command...>
    local cap=$1 region=$2; shift 2
    env LD_PRELOAD="$LIB" CUDA_DEVICE_MEMORY_LIMIT="$cap" \
        CUDA_DEVICE_MEMORY_SHARED_CACHE="$WORK/$region.cache" "$@"
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

echo "== build microbenchmark"
nvcc -O2 -arch=native -o "$WORK/bench" hack/gpu-validate/bench.cu -lcuda || exit 1

echo "== PyTorch under a 10 GiB cap: mem_get_info (bare first)"
python3 hack/gpu-validate/torch_checks.py meminfo
capped 10g torch-info env LIBCUDA_LOG_LEVEL=2 python3 hack/gpu-validate/torch_checks.py meminfo

echo "== PyTorch: 1 GiB tensors until torch.OutOfMemoryError under a 10 GiB cap"
capped 10g torch-fill python3 hack/gpu-validate/torch_checks.py fill

echo "== nvidia-smi under a 7500 MiB cap (bare first)"
nvidia-smi --query-gpu=memory.total,memory.used,memory.free --format=csv
capped 7500m smi nvidia-smi --query-gpu=memory.total,memory.used,memory.free --format=csv
capped 7500m smi nvidia-smi | grep -E "MiB" || true

echo "== two processes at once on one card: caps of 10 GiB and 20 GiB"
capped 10g pod-a python3 hack/gpu-validate/torch_checks.py fill 8 > "$WORK/a.txt" 2>&1 &
A=$!
capped 20g pod-b python3 hack/gpu-validate/torch_checks.py fill 8 > "$WORK/b.txt" 2>&1 &
B=$!
wait $A $B
echo "10 GiB pod: $(grep fill "$WORK/a.txt")"
echo "20 GiB pod: $(grep fill "$WORK/b.txt")"

echo "== overhead: interleaved runs, bare vs preloaded (cap 40 GiB), medians"
for i in $(seq "$ROUNDS"); do
    "$WORK/bench" alloc 20000 | field alloc_free_ns >> "$WORK/alloc.bare"
    capped 40g bench "$WORK/bench" alloc 20000 | field alloc_free_ns >> "$WORK/alloc.pre"
    "$WORK/bench" launch 20000 | field launch_ns >> "$WORK/launch.bare"
    capped 40g bench "$WORK/bench" launch 20000 | field launch_ns >> "$WORK/launch.pre"
    for j in 1 2 3; do
        t=$(date +%s%N); "$WORK/bench" init | field init_ms >> "$WORK/init.bare"
        echo "$(( ($(date +%s%N) - t) / 1000 ))" | awk '{print $1/1000}' >> "$WORK/wall.bare"
        t=$(date +%s%N); capped 40g bench "$WORK/bench" init | field init_ms >> "$WORK/init.pre"
        echo "$(( ($(date +%s%N) - t) / 1000 ))" | awk '{print $1/1000}' >> "$WORK/wall.pre"
    done
done
for i in $(seq "$TRAIN_ROUNDS"); do
    python3 hack/gpu-validate/torch_checks.py train | field train_step_ms >> "$WORK/train.bare"
    capped 40g train python3 hack/gpu-validate/torch_checks.py train | field train_step_ms >> "$WORK/train.pre"
done
printf "%-26s %12s %12s %9s  %s\n" metric bare preloaded delta samples
for m in alloc:cuMemAlloc+cuMemFree_ns launch:empty_launch_ns init:cuda_init_ms wall:process_wall_ms train:train_step_ms; do
    k=${m%%:*}; name=${m#*:}
    b=$(median < "$WORK/$k.bare"); p=$(median < "$WORK/$k.pre")
    d=$(awk -v b="$b" -v p="$p" 'BEGIN { if (b > 0) printf "%+.2f%%", (p - b) / b * 100; else print "n/a" }')
    [ "$k" = init ] || [ "$k" = wall ] && d=$(awk -v b="$b" -v p="$p" 'BEGIN { printf "%+.2fms", p - b }')
    printf "%-26s %12s %12s %9s  bare[%s] pre[%s]\n" "$name" "$b" "$p" "$d" \
        "$(paste -sd' ' "$WORK/$k.bare")" "$(paste -sd' ' "$WORK/$k.pre")"
done
