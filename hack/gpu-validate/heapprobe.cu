// What the driver holds for a device malloc heap: NVML's usage of this
// process at each step, for a heap of argv[1] MiB (0: no SetLimit).
#include <cuda.h>
#include <cuda_runtime.h>
#include <nvml.h>
#include <cstdio>
#include <cstdlib>
#include <unistd.h>
__global__ void plain(int *x) { if (x) *x = 1; }
__global__ void use_heap() { void *p = malloc(64); if (p) free(p); }
static unsigned long long own_mib() {
    nvmlDevice_t d; nvmlDeviceGetHandleByIndex(0, &d);
    unsigned n = 64; nvmlProcessInfo_t p[64];
    if (nvmlDeviceGetComputeRunningProcesses(d, &n, p) != NVML_SUCCESS) return 0;
    for (unsigned i = 0; i < n; i++) if (p[i].pid == (unsigned)getpid()) return p[i].usedGpuMemory >> 20;
    return 0;
}
int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoull(argv[1], 0, 10) : 0;
    nvmlInit();
    cudaFree(0);
    unsigned long long ctx = own_mib();
    plain<<<1, 1>>>(nullptr); cudaDeviceSynchronize();
    unsigned long long after_plain = own_mib();
    size_t before_limit = 0; cuCtxGetLimit(&before_limit, CU_LIMIT_MALLOC_HEAP_SIZE);
    CUresult rc = CUDA_SUCCESS;
    if (mib) rc = cuCtxSetLimit(CU_LIMIT_MALLOC_HEAP_SIZE, mib << 20);
    unsigned long long after_set = own_mib();
    use_heap<<<1, 1>>>(); cudaError_t k = cudaDeviceSynchronize();
    unsigned long long after_heap_kernel = own_mib();
    size_t free_b, total_b; cuMemGetInfo(&free_b, &total_b);
    printf("heap_mib=%zu set_rc=%d kernel=%d default_heap_mib=%zu ctx=%llu after_plain_kernel=%llu after_setlimit=%llu after_heap_kernel=%llu (heap kernel added %lld MiB; over the heap asked: %lld MiB) meminfo_used_mib=%zu\n",
           mib, (int)rc, (int)k, before_limit >> 20, ctx, after_plain, after_set, after_heap_kernel,
           (long long)after_heap_kernel - (long long)after_plain,
           (long long)after_heap_kernel - (long long)after_plain - (long long)(mib ? mib - (before_limit >> 20) : 0),
           (total_b - free_b) >> 20);
    return 0;
}
