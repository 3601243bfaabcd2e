#!/usr/bin/env bash
# How much memory the driver holds for a capped process beyond what the
# interceptor charges it, on ordinary PyTorch work near the cap: the figure
# the node agent's enforcement margin (config enforcement.marginMiB) must
# cover so that a job sitting at its cap is never killed.
#
# Build the interceptor as for hack/gpu-validate-memory.sh, then run from
# the repository root on the GPU machine (python3 with torch, nvidia-smi):
#   hack/gpu-validate-margin.sh
# LIB=<build> picks the interceptor, CAP_MIB the cap (default 10240).
# Figures go to stdout and, if set, $OUT/margin.log.
#
# Each workload runs under the cap and fills it to within a little of the
# top, then works; a sampler thread reads, every 50 ms, what NVML shows for
# the process (nvidia-smi from an environment without the preload: the
# driver's truth). It prints the largest NVML figure and its excess over
# the cap (negative: under it). A workload refused at the cap says so.
set -uo pipefail
LIB=${LIB:-$PWD/build-gpu/libtessera-cuda.so}
CAP_MIB=${CAP_MIB:-10240}
WORK=$(mktemp -d)
LOG=${OUT:-$WORK}/margin.log
exec > >(tee -a "$LOG") 2>&1
test -f "$LIB" || { echo "missing $LIB (see hack/gpu-validate-memory.sh)"; exit 1; }
python3 -c 'import torch' 2>/dev/null || { echo "no torch"; exit 1; }

cat > "$WORK/margin.py" <<'PY'
import os, subprocess, sys, threading, time
import torch
import torch.nn.functional as F

workload, cap_mib = sys.argv[1], int(sys.argv[2])
clean = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
pid = os.getpid()
peak = {"nvml": 0}
stop = threading.Event()

def nvml_mib():
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], env=clean,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        p, used = [x.strip() for x in line.split(",")]
        if int(p) == pid:
            return int(used)
    return 0

def sample():
    while not stop.is_set():
        peak["nvml"] = max(peak["nvml"], nvml_mib())
        time.sleep(0.05)

torch.empty(1, device="cuda")
threading.Thread(target=sample, daemon=True).start()

def fill(leave_mib):
    """1 GiB, then 64 MiB blocks until only `leave_mib` is left under the cap."""
    held = []
    for block in (1024, 64):
        while True:
            free, _ = torch.cuda.mem_get_info()
            if (free >> 20) - block < leave_mib:
                break
            try:
                held.append(torch.empty(block << 20, dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                break
    return held

deadline = time.time() + 8
if workload == "fill":
    held = fill(0)
    while time.time() < deadline:
        time.sleep(0.1)
elif workload == "matmul":
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    held = fill(1024)
    while time.time() < deadline:
        c = a @ b
        torch.cuda.synchronize()
elif workload == "conv":
    torch.backends.cudnn.benchmark = True
    x = torch.randn(64, 64, 112, 112, device="cuda", dtype=torch.float16)
    w = torch.randn(128, 64, 3, 3, device="cuda", dtype=torch.float16)
    held = fill(2048)
    while time.time() < deadline:
        y = F.conv2d(x, w, padding=1)
        torch.cuda.synchronize()
elif workload == "attention":
    q = torch.randn(8, 32, 4096, 128, device="cuda", dtype=torch.bfloat16)
    held = fill(1024)
    while time.time() < deadline:
        o = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.cuda.synchronize()
elif workload == "train":
  try:
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(8)]).cuda()
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(512, 4096, device="cuda")
    held = fill(2048)
    while time.time() < deadline:
        loss = model(x).square().mean()
        loss.backward()
        opt.step(); opt.zero_grad()
        torch.cuda.synchronize()
  except torch.OutOfMemoryError:
    print("train: refused at the cap (out of memory)", flush=True)
time.sleep(0.3)
stop.set()
print(f"{workload:10s} nvml_peak={peak['nvml']} MiB nvml_over_cap={peak['nvml'] - cap_mib} MiB",
      flush=True)
PY

echo "== driver memory beyond the interceptor's charge, cap ${CAP_MIB} MiB, $(basename "$LIB") ($(date -u +%FT%TZ))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
for workload in fill matmul conv attention train; do
    env LD_PRELOAD="$LIB" CUDA_DEVICE_MEMORY_LIMIT="${CAP_MIB}m" \
        CUDA_DEVICE_MEMORY_SHARED_CACHE="$WORK/$workload.cache" \
        python3 "$WORK/margin.py" "$workload" "$CAP_MIB" 2>&1 | grep -v Warning
done
exit 0
