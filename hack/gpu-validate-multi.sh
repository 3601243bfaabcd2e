#!/usr/bin/env bash
# Multi-GPU validation of libtessera-cuda.so (issue 9): a container holding
# two cards, each with its own cap, as the node agent sets it up
# (NVIDIA_VISIBLE_DEVICES / TESSERA_VISIBLE_UUIDS = the cards' UUIDs,
# CUDA_DEVICE_MEMORY_LIMIT_0 = 20 GiB, CUDA_DEVICE_MEMORY_LIMIT_1 = 30 GiB).
#
# Build here first (the GPU machine has no Rust toolchain; build-gpu/ is
# git-ignored):
#   cargo build --release -p tessera-interceptor -p tessera-node-agent
#   mkdir -p build-gpu && cp target/release/libtessera_cuda.so build-gpu/libtessera-cuda.so
#   cp target/release/tessera-node-agent build-gpu/
# then run from the repository root on a machine with two or more GPUs
# (needs python3 with torch, nvidia-smi). With one GPU (or --single) it runs
# the subset one card allows and says what it left out. Figures go to stdout
# and, if set, $OUT/multi.log.
#
# Two-card run: node agent discovery (--discover-once: both cards, NUMA
# nodes, their link); per-card torch.cuda.mem_get_info(i) under 20/30 GiB;
# 1 GiB tensors until OutOfMemoryError on each card while the other card
# still allocates; CUDA_VISIBLE_DEVICES=1 (ordinal 0 must show card 1's
# 30 GiB); peer access and a checked copy between the cards; a two-process
# NCCL all-reduce (exact sum, bus bandwidth) bare and preloaded.
# One-card subset: discovery; the cap following the card through the UUID
# list when the card is the container's second card and CUDA renumbers it
# to ordinal 0 (mem_get_info(0) must show cap _1 = 30 GiB, not _0 = 20 GiB);
# OOM under that cap; a card outside the container's list refused; a
# one-rank NCCL all-reduce under the interceptor.
set -uo pipefail

LIB=${LIB:-$PWD/build-gpu/libtessera-cuda.so}
AGENT=${AGENT:-$PWD/build-gpu/tessera-node-agent}
WORK=$(mktemp -d)
LOG=${OUT:-$WORK}/multi.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
test -f "$LIB" || { echo "missing $LIB (see the header of this script)"; exit 1; }
CHECKS=hack/gpu-validate/multi_checks.py

CARDS=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | wc -l)
UUIDS=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | paste -sd, -)
FIRST=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | head -1)
SINGLE=0
[ "${1:-}" = --single ] || [ "$CARDS" -lt 2 ] && SINGLE=1

# container <uuid-list> <command...>: one "container" with caps 20 GiB / 30 GiB
# on its first / second card and its own shared region.
container() {
    local list=$1; shift
    env LD_PRELOAD="$LIB" NVIDIA_VISIBLE_DEVICES="$list" TESSERA_VISIBLE_UUIDS="$list" \
        CUDA_DEVICE_MEMORY_LIMIT_0=20g CUDA_DEVICE_MEMORY_LIMIT_1=30g \
        CUDA_DEVICE_MEMORY_SHARED_CACHE="$WORK/region-$RANDOM.cache" "$@"
}
allreduce() { # allreduce <ranks> [prefix command...]
    local ranks=$1; shift
    "$@" python3 -m torch.distributed.run --standalone --nproc_per_node="$ranks" $CHECKS allreduce 256 2>&1 \
        | grep -E "^allreduce|Error|error" | head -5
}

echo "== machine"
nvidia-smi --query-gpu=index,name,memory.total,uuid,pci.bus_id --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -8
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'
echo "cards=$CARDS single_card_subset=$SINGLE"

echo "== node agent NVML discovery (--discover-once)"
if [ -x "$AGENT" ]; then "$AGENT" --discover-once --node-name validate 2>&1 | grep -v "^hami.io" ; else echo "missing $AGENT: discovery not run"; fi

if [ "$SINGLE" = 0 ]; then
    echo "== per-card mem_get_info, caps 20 GiB / 30 GiB (bare first)"
    python3 $CHECKS meminfo
    container "$UUIDS" python3 $CHECKS meminfo
    echo "== OOM on one card leaves the other alone"
    container "$UUIDS" python3 $CHECKS fill 0
    container "$UUIDS" python3 $CHECKS fill 1
    echo "== CUDA_VISIBLE_DEVICES=1: ordinal 0 is the second card, cap 30 GiB"
    CUDA_VISIBLE_DEVICES=1 container "$UUIDS" python3 $CHECKS meminfo
    echo "== peer access (bare, then preloaded)"
    python3 $CHECKS peer
    container "$UUIDS" python3 $CHECKS peer
    echo "== two-process NCCL all-reduce, 256 MiB float32 (bare, then preloaded), NCCL_NVLS_ENABLE=0"
    allreduce 2
    allreduce 2 container "$UUIDS"
else
    FAKE=GPU-00000000-0000-0000-0000-0000000000aa
    echo "== one card as the container's second card: list $FAKE,<this card>, CUDA_VISIBLE_DEVICES=<this card>"
    python3 $CHECKS meminfo
    CUDA_VISIBLE_DEVICES="$FIRST" container "$FAKE,$FIRST" python3 $CHECKS meminfo
    echo "-- expected: total 30.000 GiB (cap _1 follows the card), not 20.000"
    echo "== the same card as the container's first card: cap _0 = 20 GiB"
    container "$FIRST,$FAKE" python3 $CHECKS meminfo
    echo "== OOM under the renumbered card's 30 GiB cap"
    CUDA_VISIBLE_DEVICES="$FIRST" container "$FAKE,$FIRST" python3 $CHECKS fill 0
    echo "== a card outside the container's list is refused"
    container "$FAKE" python3 -c 'import torch; torch.zeros(1, device="cuda"); print("card outside list: NOT refused")' 2>&1 \
        | grep -E "refused|Error|NOT" | head -3
    echo "== one-rank NCCL all-reduce under the interceptor (bare, then preloaded)"
    allreduce 1
    allreduce 1 container "$FIRST"
    echo "== not run here (needs two cards): per-card caps on two real cards, OOM isolation between them,"
    echo "   CUDA_VISIBLE_DEVICES=1 on a two-card machine, peer access, two-process NCCL all-reduce and bus bandwidth, the NVLink/P2P link report"
fi
