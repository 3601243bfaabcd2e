// Escape attempts against a memory cap, for hack/gpu-validate-escapes.sh.
// Driver API only (linked with -lcuda), so the interceptor's hooks are on
// the path whenever it is preloaded.
//   escapes vmm GIB_EACH MAX      cuMemCreate -> cuMemMap -> cuMemSetAccess ->
//                                 touch -> cuMemRelease, repeated until refused
//                                 or MAX times (vectorAddMMAP's pattern)
//   escapes fill MIB_EACH MAX     cuMemAlloc + touch until refused or MAX
//   escapes vllm GIB_EACH N       create/map N chunks, unmap+release them all
//                                 (sleep), create/map again (wake): must work
//   escapes pool GIB MAX          a pool that keeps freed memory (release
//                                 threshold = max): GIB allocated, touched and
//                                 freed into it, then cuMemAlloc 512 MiB chunks
//                                 until refused or MAX
//   escapes graph GIB MAX         a graph with a GIB allocation node and its
//                                 free node, launched (the driver keeps the
//                                 memory for graphs), then the chunks
//   escapes heap GIB MAX          cuCtxSetLimit(MALLOC_HEAP_SIZE, GIB), a kernel
//                                 that mallocs, then the chunks
//   escapes lmem 0 MAX            a kernel with 64 KiB of local memory per
//                                 thread (the driver reserves it for every
//                                 resident thread), then the chunks
//   escapes mipmap N MAX          16384x16384 float4 mipmapped arrays (N
//                                 levels) until refused or MAX
// Each prints `mapped=`/`filled=` and the bytes it holds, then `ready` and
// sleeps until killed, so the caller can read NVML's per-process usage.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unistd.h>
#include <vector>

#define CHECK(x) do { CUresult r = (x); if (r != CUDA_SUCCESS) { \
    std::fprintf(stderr, "%s failed: %d\n", #x, (int)r); std::exit(1); } } while (0)

__global__ void use_heap() {
    void *p = malloc(64);
    if (p) free(p);
}

/* 64 KiB of local memory per thread, indexed at run time so it stays in
 * local memory: the driver reserves it for every thread the card can hold
 * at once when the kernel is launched. */
constexpr int LMEM_FLOATS = 16384;
__global__ void use_lmem(float *out, int k) {
    float buf[LMEM_FLOATS];
    for (int i = 0; i < LMEM_FLOATS; i++) buf[(i * 7 + k) % LMEM_FLOATS] = (float)(i * k);
    out[blockIdx.x * blockDim.x + threadIdx.x] = buf[(k * 13 + threadIdx.x) % LMEM_FLOATS];
}

/* cuMemAlloc 512 MiB chunks (touched) until refused or `max`; prints them. */
static void fill_after(const char *what, int max) {
    int n = 0;
    CUresult rc = CUDA_SUCCESS;
    for (; n < max; n++) {
        CUdeviceptr p;
        if ((rc = cuMemAlloc(&p, 512ull << 20))) break;
        CHECK(cuMemsetD8(p, 1, 512ull << 20));
    }
    std::printf("%s then filled=%d x 512 MiB last_rc=%d\n", what, n, (int)rc);
}

static CUresult create_map(CUdeviceptr *va, size_t bytes, CUmemGenericAllocationHandle *h) {
    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    CUresult rc = cuMemCreate(h, bytes, &prop, 0);
    if (rc) return rc;
    if (!*va && (rc = cuMemAddressReserve(va, bytes, 0, 0, 0))) return rc;
    if ((rc = cuMemMap(*va, bytes, 0, *h, 0))) return rc;
    CUmemAccessDesc access = {};
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    if ((rc = cuMemSetAccess(*va, bytes, &access, 1))) return rc;
    return cuMemsetD8(*va, 1, bytes); // touched: really backed
}

int main(int argc, char **argv) {
    setvbuf(stdout, nullptr, _IONBF, 0);
    const char *mode = argc > 1 ? argv[1] : "vmm";
    size_t each = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 2;
    int max = argc > 3 ? std::atoi(argv[3]) : 40;
    CHECK(cuInit(0));
    CUdevice dev;
    CUcontext ctx;
    CHECK(cuDeviceGet(&dev, 0));
    CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CHECK(cuCtxSetCurrent(ctx));
    if (!std::strcmp(mode, "vmm")) {
        size_t bytes = each << 30;
        int n = 0;
        CUresult rc = CUDA_SUCCESS;
        for (; n < max; n++) {
            CUdeviceptr va = 0;
            CUmemGenericAllocationHandle h;
            if ((rc = create_map(&va, bytes, &h))) break;
            CHECK(cuMemRelease(h)); // the mapping keeps it alive
        }
        std::printf("mapped=%d each_gib=%zu last_rc=%d claimed_gib=%zu\n", n, each, (int)rc, n * each);
    } else if (!std::strcmp(mode, "fill")) {
        size_t bytes = each << 20;
        int n = 0;
        CUresult rc = CUDA_SUCCESS;
        for (; n < max; n++) {
            CUdeviceptr p;
            if ((rc = cuMemAlloc(&p, bytes))) break;
            CHECK(cuMemsetD8(p, 1, bytes));
        }
        std::printf("filled=%d each_mib=%zu last_rc=%d claimed_mib=%zu\n", n, each, (int)rc, n * each);
    } else if (!std::strcmp(mode, "vllm")) {
        size_t bytes = each << 30;
        std::vector<CUdeviceptr> va(max, 0);
        std::vector<CUmemGenericAllocationHandle> h(max);
        size_t free0, total;
        for (int i = 0; i < max; i++) CHECK(create_map(&va[i], bytes, &h[i]));
        CHECK(cuMemGetInfo(&free0, &total));
        for (int i = 0; i < max; i++) { CHECK(cuMemUnmap(va[i], bytes)); CHECK(cuMemRelease(h[i])); }
        size_t free1;
        CHECK(cuMemGetInfo(&free1, &total));
        for (int i = 0; i < max; i++) CHECK(create_map(&va[i], bytes, &h[i]));
        size_t free2;
        CHECK(cuMemGetInfo(&free2, &total));
        std::printf("vllm awake_free_mib=%zu asleep_free_mib=%zu awake_again_free_mib=%zu total_mib=%zu\n",
                    free0 >> 20, free1 >> 20, free2 >> 20, total >> 20);
    }
    if (!std::strcmp(mode, "pool")) {
        CUmemPoolProps props = {};
        props.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
        props.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = 0;
        CUmemoryPool pool;
        CHECK(cuMemPoolCreate(&pool, &props));
        cuuint64_t keep = ~0ull;
        CHECK(cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &keep));
        CUstream s;
        CHECK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
        CUdeviceptr p;
        CUresult rc = cuMemAllocFromPoolAsync(&p, each << 30, pool, s);
        if (!rc) { CHECK(cuMemsetD8Async(p, 1, each << 30, s)); CHECK(cuMemFreeAsync(p, s)); }
        CHECK(cuStreamSynchronize(s));
        cuuint64_t reserved = 0;
        CHECK(cuMemPoolGetAttribute(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, &reserved));
        std::printf("pool alloc_rc=%d freed, pool still reserves %llu MiB\n", (int)rc, (unsigned long long)(reserved >> 20));
        fill_after("pool", max);
    } else if (!std::strcmp(mode, "graph")) {
        CUgraph g;
        CHECK(cuGraphCreate(&g, 0));
        CUDA_MEM_ALLOC_NODE_PARAMS params = {};
        params.poolProps.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
        params.poolProps.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        params.poolProps.location.id = 0;
        params.bytesize = each << 30;
        CUgraphNode alloc, freed;
        CHECK(cuGraphAddMemAllocNode(&alloc, g, nullptr, 0, &params));
        CHECK(cuGraphAddMemFreeNode(&freed, g, &alloc, 1, params.dptr));
        CUgraphExec exec;
        CHECK(cuGraphInstantiateWithFlags(&exec, g, 0));
        CUresult rc = cuGraphLaunch(exec, 0);
        CHECK(cuCtxSynchronize());
        cuuint64_t reserved = 0;
        CHECK(cuDeviceGetGraphMemAttribute(dev, CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT, &reserved));
        std::printf("graph launch_rc=%d, graphs reserve %llu MiB\n", (int)rc, (unsigned long long)(reserved >> 20));
        fill_after("graph", max);
    } else if (!std::strcmp(mode, "heap")) {
        CUresult rc = cuCtxSetLimit(CU_LIMIT_MALLOC_HEAP_SIZE, each << 30);
        use_heap<<<1, 1>>>();
        cudaError_t k = cudaDeviceSynchronize();
        std::printf("heap set_rc=%d kernel=%d\n", (int)rc, (int)k);
        fill_after("heap", max);
    } else if (!std::strcmp(mode, "lmem")) {
        size_t stack0 = 0, stack1 = 0, free0, free1, total;
        CHECK(cuCtxGetLimit(&stack0, CU_LIMIT_STACK_SIZE));
        CHECK(cuMemGetInfo(&free0, &total));
        float *out = nullptr;
        cudaMalloc(&out, 4 << 20);
        use_lmem<<<1024, 256>>>(out, 3);
        cudaError_t k = cudaDeviceSynchronize();
        CHECK(cuCtxGetLimit(&stack1, CU_LIMIT_STACK_SIZE));
        CHECK(cuMemGetInfo(&free1, &total));
        std::printf("lmem kernel=%d stack_bytes %zu -> %zu, free seen by the process %zu -> %zu MiB\n",
                    (int)k, stack0, stack1, free0 >> 20, free1 >> 20);
        fill_after("lmem", max);
    } else if (!std::strcmp(mode, "mipmap")) {
        CUDA_ARRAY3D_DESCRIPTOR d = {};
        d.Width = 16384; d.Height = 16384; d.Depth = 0;
        d.Format = CU_AD_FORMAT_FLOAT; d.NumChannels = 4;
        int n = 0;
        CUresult rc = CUDA_SUCCESS;
        for (; n < max; n++) {
            CUmipmappedArray m;
            if ((rc = cuMipmappedArrayCreate(&m, &d, (unsigned)each))) break;
        }
        std::printf("mipmap created=%d of 16384x16384 float4 x %zu levels (4 GiB+ each) last_rc=%d\n", n, each, (int)rc);
    }
    std::printf("ready\n");
    sleep(600);
    return 0;
}
