// Microbenchmarks for the interceptor's overhead, run with and without
// LD_PRELOAD of libtessera-cuda.so by hack/gpu-validate-memory.sh.
//   bench alloc N   median ns of cuMemAlloc(2 MiB)+cuMemFree over N pairs
//   bench launch N  median ns per empty-kernel launch (batches of 100, synced)
//   bench init      ms from main() to a context with one allocation done
// Uses the driver API (linked with -lcuda) so the hooks are on the path.
#include <cuda.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(x) do { CUresult r = (x); if (r != CUDA_SUCCESS) { \
    std::fprintf(stderr, "%s failed: %d\n", #x, (int)r); std::exit(1); } } while (0)

static double now_ns() {
    return std::chrono::duration<double, std::nano>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

__global__ void empty_kernel() {}

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

int main(int argc, char **argv) {
    double t0 = now_ns();
    const char *mode = argc > 1 ? argv[1] : "alloc";
    int n = argc > 2 ? std::atoi(argv[2]) : 10000;
    CHECK(cuInit(0));
    CUdevice dev;
    CUcontext ctx;
    CHECK(cuDeviceGet(&dev, 0));
    CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CHECK(cuCtxSetCurrent(ctx));
    if (!std::strcmp(mode, "init")) {
        CUdeviceptr p;
        CHECK(cuMemAlloc(&p, 1 << 20));
        double t1 = now_ns();
        CHECK(cuMemFree(p));
        std::printf("init_ms=%.3f\n", (t1 - t0) / 1e6);
        return 0;
    }
    if (!std::strcmp(mode, "alloc")) {
        std::vector<double> samples;
        samples.reserve(n);
        for (int i = 0; i < n + 100; i++) {
            CUdeviceptr p;
            double a = now_ns();
            CHECK(cuMemAlloc(&p, 2 << 20));
            CHECK(cuMemFree(p));
            double b = now_ns();
            if (i >= 100) samples.push_back(b - a);  // first 100: warm-up
        }
        std::printf("alloc_free_ns=%.1f\n", median(samples));
        return 0;
    }
    if (!std::strcmp(mode, "launch")) {
        cudaFree(0);  // the runtime adopts the primary context
        for (int i = 0; i < 1000; i++) empty_kernel<<<1, 1>>>();
        if (cudaDeviceSynchronize() != cudaSuccess) return 1;
        std::vector<double> samples;
        for (int b = 0; b < n / 100; b++) {
            double s = now_ns();
            for (int i = 0; i < 100; i++) empty_kernel<<<1, 1>>>();
            cudaDeviceSynchronize();
            samples.push_back((now_ns() - s) / 100);
        }
        if (cudaGetLastError() != cudaSuccess) return 1;
        std::printf("launch_ns=%.1f\n", median(samples));
        return 0;
    }
    std::fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
