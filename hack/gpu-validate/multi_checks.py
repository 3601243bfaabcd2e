"""Multi-card checks for hack/gpu-validate-multi.sh (issue 9). Run bare or
under LD_PRELOAD of libtessera-cuda.so with per-card caps set.

  multi_checks.py meminfo           torch.cuda.mem_get_info(i) for every visible card
  multi_checks.py fill I            1 GiB tensors on card I until torch.OutOfMemoryError,
                                    then 1 GiB on every other card (must still fit)
  multi_checks.py peer              can_device_access_peer both ways and a checked copy 0 -> 1
  multi_checks.py allreduce [MiB]   one rank of an NCCL all-reduce (start with torchrun):
                                    exact-sum check on random data, then bus bandwidth
"""
import os
import statistics
import sys

import torch

GIB = 1 << 30


def meminfo():
    n = torch.cuda.device_count()
    print(f"device_count={n}")
    for i in range(n):
        free, total = torch.cuda.mem_get_info(i)
        name = torch.cuda.get_device_name(i)
        print(f"card={i} total={total} ({total / GIB:.3f} GiB) free={free} ({free / GIB:.3f} GiB) name={name!r}")


def fill(card):
    n = torch.cuda.device_count()
    held = []
    error = None
    try:
        while len(held) < 1000:
            held.append(torch.empty(GIB, dtype=torch.uint8, device=f"cuda:{card}"))
    except torch.OutOfMemoryError as e:
        error = type(e).__name__
    total = torch.cuda.mem_get_info(card)[1]
    print(f"fill card={card} total={total / GIB:.3f}GiB fitted={len(held)}GiB error={error}", flush=True)
    for other in range(n):
        if other == card:
            continue
        try:
            t = torch.ones(GIB // 4, dtype=torch.float32, device=f"cuda:{other}")
            ok = bool(t.sum().item() == GIB // 4)
            print(f"other card={other} alloc_1GiB=ok sum_ok={ok} free={torch.cuda.mem_get_info(other)[0] / GIB:.3f}GiB")
        except torch.OutOfMemoryError:
            print(f"other card={other} alloc_1GiB=OutOfMemoryError")


def peer():
    n = torch.cuda.device_count()
    if n < 2:
        print("peer skipped: one card")
        return
    a = torch.cuda.can_device_access_peer(0, 1)
    b = torch.cuda.can_device_access_peer(1, 0)
    x = torch.randn(1 << 26, device="cuda:0")
    y = x.to("cuda:1")
    same = torch.equal(x.cpu(), y.cpu())
    print(f"peer can_0_1={a} can_1_0={b} copy_exact={same}")


def allreduce(mib=256):
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device(f"cuda:{local}"))
    # Correctness: every rank holds base * (rank + 1); the sum is base * w(w+1)/2.
    g = torch.Generator(device="cpu").manual_seed(1234)
    base = torch.randn(1 << 22, generator=g, dtype=torch.float64).cuda()
    x = base * (rank + 1)
    dist.all_reduce(x)
    expected = base * (world * (world + 1) / 2)
    rel = (torch.linalg.norm(x - expected) / torch.linalg.norm(expected)).item()
    # Bandwidth: float32 buffer of `mib` MiB, 5 warm-ups, 20 timed.
    n = (mib << 20) // 4
    buf = torch.randn(n, device="cuda")
    for _ in range(5):
        dist.all_reduce(buf)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dist.all_reduce(buf)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(times)
    algbw = n * 4 / t / 1e9
    busbw = algbw * 2 * (world - 1) / world if world > 1 else algbw
    if rank == 0:
        print(f"allreduce world={world} rel_err={rel:.2e} size={mib}MiB median_s={t:.6f} algbw_GBps={algbw:.1f} busbw_GBps={busbw:.1f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "meminfo":
        meminfo()
    elif what == "fill":
        fill(int(sys.argv[2]))
    elif what == "peer":
        peer()
    elif what == "allreduce":
        allreduce(int(sys.argv[2]) if len(sys.argv) > 2 else 256)
    else:
        sys.exit(f"unknown check {what}")
