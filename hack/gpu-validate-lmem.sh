#!/usr/bin/env bash
# The local-memory charge on a real GPU (before/after builds of the
# interceptor: OLD= and NEW= paths under build-gpu/), the launch cost of
# each, and the node agent's discovery if build-gpu/tessera-node-agent
# exists. Results: hack/gpu-validate/h200-lmem-results.log.
set -uo pipefail
OUT=${OUT:-/tmp}
OLD=${OLD:-$PWD/build-gpu/libtessera-cuda-merged.so}
NEW=${NEW:-$PWD/build-gpu/libtessera-cuda.so}
nvcc -O2 -arch=native -o /tmp/escapes hack/gpu-validate/escapes.cu -lcuda 2>&1 | tail -3
nvcc -O2 -arch=native -o /tmp/bench hack/gpu-validate/bench.cu -lcuda 2>&1 | tail -3
held() { nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | awk -F', *' -v p="$1" '$1 == p { print $2 }'; }
run_lmem() { # name lib cap
  env LD_PRELOAD=$2 CUDA_DEVICE_MEMORY_LIMIT=$3 CUDA_DEVICE_MEMORY_SHARED_CACHE=/tmp/$1.cache /tmp/escapes lmem 0 80 > /tmp/$1.txt 2>&1 &
  local pid=$!
  for _ in $(seq 1200); do grep -q ready /tmp/$1.txt && break; kill -0 $pid 2>/dev/null || break; sleep 0.05; done
  echo "== lmem $1 (cap $3)"; grep -v ready /tmp/$1.txt | sed 's/^/    /'
  echo "    NVML holds $(held $pid) MiB for it"
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
}
run_lmem old-10g $OLD 10g
run_lmem new-10g $NEW 10g
run_lmem new-30g $NEW 30g
echo "== launch cost, ns per empty-kernel launch (median of batches), capped 40g, 5 rounds alternating"
for r in 1 2 3 4 5; do
  b=$(/tmp/bench launch 20000 | grep -o 'launch_ns=[0-9.]*')
  o=$(env LD_PRELOAD=$OLD CUDA_DEVICE_MEMORY_LIMIT=40g CUDA_DEVICE_MEMORY_SHARED_CACHE=/tmp/b-old.cache /tmp/bench launch 20000 | grep -o 'launch_ns=[0-9.]*')
  n=$(env LD_PRELOAD=$NEW CUDA_DEVICE_MEMORY_LIMIT=40g CUDA_DEVICE_MEMORY_SHARED_CACHE=/tmp/b-new.cache /tmp/bench launch 20000 | grep -o 'launch_ns=[0-9.]*')
  echo "    round $r: bare $b  old-interceptor $o  new-interceptor $n"
done
echo "== torch under the new interceptor (10 GiB cap)"
env LD_PRELOAD=$NEW CUDA_DEVICE_MEMORY_LIMIT=10g CUDA_DEVICE_MEMORY_SHARED_CACHE=/tmp/t.cache python3 -c '
import torch
a = torch.randn(4096, 4096, device="cuda"); b = a @ a; torch.cuda.synchronize()
free, total = torch.cuda.mem_get_info(); print("torch ok, total MiB", total >> 20, "free MiB", free >> 20)'
if [ -x build-gpu/tessera-node-agent ]; then
  echo "== node agent discovery on this machine"
  build-gpu/tessera-node-agent --discover-once --node-name dev 2>&1 | cut -c1-300
fi
