// Load generator for hack/gpu-validate-sm.sh: a compute-bound kernel
// launched in a loop without host synchronisation (the queue is kept about
// 64 kernels deep with events, so host-side counts track completed work).
//   sm_load SECONDS [ITERS]   run for SECONDS; print kernels done per
//                             one-second window and the mean rate
// Prints `pid=… rate=<kernels/s> windows=<n0,n1,…>`.
#include <cuda_runtime.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CHECK(x) do { cudaError_t check_rc_ = (x); if (check_rc_ != cudaSuccess) { \
    std::fprintf(stderr, "%s failed: %s\n", #x, cudaGetErrorString(check_rc_)); std::exit(1); } } while (0)

__global__ void spin(float *out, int iters) {
    float a = threadIdx.x * 1e-3f, b = 1.0001f;
    for (int i = 0; i < iters; i++) a = fmaf(a, b, 1e-7f);
    if (a == 12345.0f) out[blockIdx.x] = a;  // never true; keeps the loop
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? std::atof(argv[1]) : 10;
    int iters = argc > 2 ? std::atoi(argv[2]) : 40000;
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    float *out;
    CHECK(cudaMalloc(&out, 4096 * sizeof(float)));
    const int depth = 4, batch = 16;
    std::vector<cudaEvent_t> events(depth);
    for (auto &e : events) CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    auto start = std::chrono::steady_clock::now();
    auto elapsed = [&] {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    };
    std::vector<long> windows(static_cast<size_t>(seconds) + 2, 0);
    long total = 0;
    for (long b = 0;; b++) {
        double t = elapsed();
        if (t >= seconds) break;
        cudaEvent_t &ev = events[b % depth];
        if (b >= depth) CHECK(cudaEventSynchronize(ev));  // batch b-depth done
        for (int i = 0; i < batch; i++) spin<<<sms * 2, 256>>>(out, iters);
        CHECK(cudaGetLastError());
        CHECK(cudaEventRecord(ev));
        if (b >= depth) {  // count the batch that just completed
            windows[static_cast<size_t>(t)] += batch;
            total += batch;
        }
    }
    CHECK(cudaDeviceSynchronize());
    double t = elapsed();
    std::string w;
    for (size_t i = 0; i < static_cast<size_t>(seconds); i++)
        w += (i ? "," : "") + std::to_string(windows[i]);
    std::printf("pid=%d seconds=%.2f kernels=%ld rate=%.1f windows=%s\n", (int)getpid(), t,
                total, total / t, w.c_str());
    return 0;
}
