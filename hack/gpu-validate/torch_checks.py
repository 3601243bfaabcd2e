"""PyTorch checks for hack/gpu-validate-memory.sh (run under LD_PRELOAD of
libtessera-cuda.so with CUDA_DEVICE_MEMORY_LIMIT set, or bare).

  torch_checks.py meminfo          print torch.cuda.mem_get_info() in bytes and GiB
  torch_checks.py fill [hold_s]    1 GiB tensors until torch.OutOfMemoryError
  torch_checks.py train [steps]    median training-step time of a small MLP
"""
import statistics
import sys
import time

import torch

GIB = 1 << 30


def meminfo():
    free, total = torch.cuda.mem_get_info()
    print(f"mem_get_info total={total} ({total / GIB:.3f} GiB) free={free} ({free / GIB:.3f} GiB)")


def fill(hold_s=0.0):
    free, total = torch.cuda.mem_get_info()
    tensors = []
    error = None
    try:
        while len(tensors) < 1000:
            tensors.append(torch.empty(GIB, dtype=torch.uint8, device="cuda"))
    except torch.OutOfMemoryError as e:  # what PyTorch raises for CUDA_ERROR_OUT_OF_MEMORY
        error = type(e).__name__
    print(f"fill total={total / GIB:.3f}GiB fitted={len(tensors)}GiB error={error}", flush=True)
    time.sleep(hold_s)


def train(steps=300):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4096, 4096), torch.nn.ReLU(),
        torch.nn.Linear(4096, 4096), torch.nn.ReLU(),
        torch.nn.Linear(4096, 1024),
    ).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(256, 4096, device="cuda")
    y = torch.randn(256, 1024, device="cuda")
    times = []
    for i in range(steps + 30):
        torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)  # grads freed and re-allocated: the allocator path is exercised
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        if i >= 30:
            times.append(time.perf_counter() - t)
    print(f"train_step_ms={statistics.median(times) * 1e3:.4f}")


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "meminfo":
        meminfo()
    elif what == "fill":
        fill(float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
    elif what == "train":
        train(int(sys.argv[2]) if len(sys.argv) > 2 else 300)
