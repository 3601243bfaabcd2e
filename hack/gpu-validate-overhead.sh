#!/usr/bin/env bash
# Driver memory no call asks for (code loaded at first launches, what the
# first launch in a context sets up), on a real GPU: how much there is,
# whether the interceptor charges it, and what measuring it costs.
#
# Build the interceptor as for hack/gpu-validate-memory.sh; OLD= names an
# earlier build to compare (default build-gpu/libtessera-cuda-before.so),
# NEW= this one (build-gpu/libtessera-cuda.so). Run from the repository root
# on the GPU machine (nvcc, python3 with torch, nvidia-smi). Figures go to
# stdout and, if set, $OUT/overhead.log.
#
# 1. heapprobe (gpu-validate/heapprobe.cu): NVML's reading of the process
#    after the context, after a first plain kernel, after a malloc heap of
#    N MiB is set and its kernel run; bare for several N, then under OLD and
#    NEW with a 40 GiB cap, where meminfo_used is what the interceptor
#    charges (it should equal NVML's after_heap_kernel).
# 2. PyTorch under a 10 GiB cap: a first training iteration of a small
#    conv + attention model (dozens of distinct kernels, each loaded at its
#    first launch), a second one, then 64 MiB tensors until out-of-memory;
#    prints both iteration times, the chunks that fitted and what NVML shows
#    the process holding against the cap. Bare (no cap, no fill), OLD and NEW
#    alternate for ROUNDS rounds (default 3).
set -uo pipefail
OLD=${OLD:-$PWD/build-gpu/libtessera-cuda-before.so}
NEW=${NEW:-$PWD/build-gpu/libtessera-cuda.so}
ROUNDS=${ROUNDS:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
LOG=${OUT:-$WORK}/overhead.log
exec > >(tee -a "$LOG") 2>&1
nvcc -O2 -arch=native -o "$WORK/heapprobe" "$HERE/gpu-validate/heapprobe.cu" -lcuda -lnvidia-ml || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
capped() { # capped <lib> <cap> <command...>
    local lib=$1 cap=$2; shift 2
    env LD_PRELOAD="$lib" CUDA_DEVICE_MEMORY_LIMIT="$cap" \
        CUDA_DEVICE_MEMORY_SHARED_CACHE="$WORK/region-$RANDOM.cache" "$@"
}

echo "== 1. heapprobe, bare"
for m in 0 1024 8192; do "$WORK/heapprobe" $m; done
for which in OLD NEW; do
    lib=${!which}
    echo "== 1. heapprobe under $which ($(basename "$lib")), cap 40g: meminfo_used is the interceptor's charge"
    for m in 0 1024 8192; do capped "$lib" 40g "$WORK/heapprobe" $m; done
done

cat > "$WORK/warm.py" <<'PY'
import os, subprocess, sys, time
import torch
import torch.nn as nn
import torch.nn.functional as F

fill = sys.argv[1] == "fill"
bare_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}

def held_mib():
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, env=bare_env).stdout
    for line in out.splitlines():
        pid, used = [x.strip() for x in line.split(",")]
        if int(pid) == os.getpid():
            return int(used)
    return -1

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1); self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1); self.bn2 = nn.BatchNorm2d(64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True); self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)
    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x))); x = F.max_pool2d(x, 2)
        x = F.gelu(self.bn2(self.conv2(x))); x = F.avg_pool2d(x, 2)
        t = x.flatten(2).transpose(1, 2)
        t = self.norm(t + self.attn(t, t, t, need_weights=False)[0])
        return self.head(t.mean(1))

def step(model, opt):
    x = torch.randn(64, 3, 64, 64, device="cuda"); y = torch.randint(0, 10, (64,), device="cuda")
    loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
    torch.cuda.synchronize()

torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
model = Net().cuda(); opt = torch.optim.AdamW(model.parameters())
t0 = time.perf_counter(); step(model, opt); t1 = time.perf_counter(); step(model, opt); t2 = time.perf_counter()
line = f"first_iter_ms={(t1 - t0) * 1e3:.1f} second_iter_ms={(t2 - t1) * 1e3:.1f}"
if fill:
    chunks = []
    try:
        while len(chunks) < 4096:
            chunks.append(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
    except torch.OutOfMemoryError:
        pass
    torch.cuda.synchronize()
    line += f" chunks_64mib={len(chunks)} nvml_held_mib={held_mib()}"
else:
    line += f" nvml_held_mib={held_mib()}"
print(line, flush=True)
PY
echo "== 2. PyTorch: first and second training iteration, then 64 MiB tensors to out-of-memory under a 10 GiB cap (10240 MiB)"
for r in $(seq "$ROUNDS"); do
    echo "    round $r bare: $(python3 "$WORK/warm.py" nofill 2>&1 | tail -1)"
    echo "    round $r OLD:  $(capped "$OLD" 10g python3 "$WORK/warm.py" fill 2>&1 | tail -1)"
    echo "    round $r NEW:  $(capped "$NEW" 10g python3 "$WORK/warm.py" fill 2>&1 | tail -1)"
done
