/* Test client for the interceptor: reaches the (fake) driver in one of three
 * ways, chosen at compile time, and runs a scenario named on the command
 * line. MODE_LINKED: linked against libcuda.so.1. MODE_DLSYM: dlopen+dlsym.
 * MODE_PROCADDR: dlopen, then everything through cuGetProcAddress_v2 with
 * explicit versions and flags. Prints `key=value` lines for the Rust tests. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext;
typedef void *CUarray;
#define MIB (1024ULL * 1024ULL)

typedef struct { size_t Width, Height; unsigned Format, NumChannels; } ArrayDesc;
typedef struct { size_t Width, Height, Depth; unsigned Format, NumChannels, Flags; } Array3DDesc;
typedef struct { unsigned type, handleTypes, locType; int locId; void *win32; unsigned char flags[8]; } AllocProp;

static CUresult (*p_cuInit)(unsigned);
static CUresult (*p_retain)(CUcontext *, int);
static CUresult (*p_release)(int);
static CUresult (*p_setCurrent)(CUcontext);
static CUresult (*p_getInfo)(size_t *, size_t *);
static CUresult (*p_totalMem)(size_t *, int);
static CUresult (*p_alloc)(CUdeviceptr *, size_t);
static CUresult (*p_free)(CUdeviceptr);
static CUresult (*p_pitch)(CUdeviceptr *, size_t *, size_t, size_t, unsigned);
static CUresult (*p_managed)(CUdeviceptr *, size_t, unsigned);
static CUresult (*p_async)(CUdeviceptr *, size_t, void *);
static CUresult (*p_freeAsync)(CUdeviceptr, void *);
static CUresult (*p_pool)(CUdeviceptr *, size_t, void *, void *);
static CUresult (*p_create)(unsigned long long *, size_t, const AllocProp *, unsigned long long);
static CUresult (*p_releaseHandle)(unsigned long long);
static CUresult (*p_array)(CUarray *, const ArrayDesc *);
static CUresult (*p_array3d)(CUarray *, const Array3DDesc *);
static CUresult (*p_arrayDestroy)(CUarray);
static CUresult (*p_ctxCreate)(CUcontext *, unsigned, int);
static CUresult (*p_ctxDestroy)(CUcontext);
static CUresult (*p_map)(CUdeviceptr, size_t, size_t, unsigned long long, unsigned long long);
static CUresult (*p_unmap)(CUdeviceptr, size_t);
static CUresult (*p_reserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
static CUresult (*p_setAccess)(CUdeviceptr, size_t, const void *, size_t);
static CUresult (*p_retainHandle)(unsigned long long *, void *);
static CUresult (*p_export)(void *, unsigned long long, unsigned, unsigned long long);
static CUresult (*p_import)(unsigned long long *, void *, unsigned);
static CUresult (*p_mipCreate)(void **, const Array3DDesc *, unsigned);
static CUresult (*p_mipDestroy)(void *);
static CUresult (*p_setLimit)(unsigned, size_t);
static CUresult (*p_poolCreate)(void **, const void *);
static CUresult (*p_poolDestroy)(void *);
static CUresult (*p_defaultPool)(void **, int);
static CUresult (*p_poolSetAttr)(void *, int, void *);
static CUresult (*p_poolTrim)(void *, size_t);
static CUresult (*p_graphCreate)(void **, unsigned);
static CUresult (*p_addAllocNode)(void **, void *, const void *, size_t, void *);
static CUresult (*p_instantiate)(void **, void *, unsigned long long);
static CUresult (*p_graphLaunch)(void *, void *);
static CUresult (*p_graphMemTrim)(int);
static CUresult (*p_execDestroy)(void *);
static CUresult (*p_graphDestroy)(void *);
static CUresult (*p_launch)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                            unsigned, void *, void **, void **);
static void *driver;

#if defined(MODE_LINKED)
CUresult cuInit(unsigned);
CUresult cuDevicePrimaryCtxRetain(CUcontext *, int);
CUresult cuDevicePrimaryCtxRelease_v2(int);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuMemGetInfo_v2(size_t *, size_t *);
CUresult cuDeviceTotalMem_v2(size_t *, int);
CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemAllocPitch_v2(CUdeviceptr *, size_t *, size_t, size_t, unsigned);
CUresult cuMemAllocManaged(CUdeviceptr *, size_t, unsigned);
CUresult cuMemAllocAsync(CUdeviceptr *, size_t, void *);
CUresult cuMemFreeAsync(CUdeviceptr, void *);
CUresult cuMemAllocFromPoolAsync(CUdeviceptr *, size_t, void *, void *);
CUresult cuMemCreate(unsigned long long *, size_t, const AllocProp *, unsigned long long);
CUresult cuMemRelease(unsigned long long);
CUresult cuArrayCreate_v2(CUarray *, const ArrayDesc *);
CUresult cuArray3DCreate_v2(CUarray *, const Array3DDesc *);
CUresult cuArrayDestroy(CUarray);
CUresult cuCtxCreate_v2(CUcontext *, unsigned, int);
CUresult cuCtxDestroy_v2(CUcontext);
CUresult cuMemMap(CUdeviceptr, size_t, size_t, unsigned long long, unsigned long long);
CUresult cuMemUnmap(CUdeviceptr, size_t);
CUresult cuMemAddressReserve(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
CUresult cuMemSetAccess(CUdeviceptr, size_t, const void *, size_t);
CUresult cuMemRetainAllocationHandle(unsigned long long *, void *);
CUresult cuMemExportToShareableHandle(void *, unsigned long long, unsigned, unsigned long long);
CUresult cuMemImportFromShareableHandle(unsigned long long *, void *, unsigned);
CUresult cuMipmappedArrayCreate(void **, const Array3DDesc *, unsigned);
CUresult cuMipmappedArrayDestroy(void *);
CUresult cuCtxSetLimit(unsigned, size_t);
CUresult cuMemPoolCreate(void **, const void *);
CUresult cuMemPoolDestroy(void *);
CUresult cuDeviceGetDefaultMemPool(void **, int);
CUresult cuMemPoolSetAttribute(void *, int, void *);
CUresult cuMemPoolTrimTo(void *, size_t);
CUresult cuGraphCreate(void **, unsigned);
CUresult cuGraphAddMemAllocNode(void **, void *, const void *, size_t, void *);
CUresult cuGraphInstantiateWithFlags(void **, void *, unsigned long long);
CUresult cuGraphLaunch(void *, void *);
CUresult cuDeviceGraphMemTrim(int);
CUresult cuGraphExecDestroy(void *);
CUresult cuGraphDestroy(void *);
CUresult cuLaunchKernel(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                        unsigned, void *, void **, void **);
#define R(var, export, base, version) var = (void *)&export
#elif defined(MODE_DLSYM)
#define R(var, export, base, version) var = dlsym(driver, #export)
#elif defined(MODE_PROCADDR)
static CUresult (*p_getProc)(const char *, void **, int, unsigned long long, int *);
#define R(var, export, base, version) do { int st = -1; \
    if (p_getProc(#base, (void **)&var, version, 0, &st) != 0) var = NULL; } while (0)
#else
#error "define MODE_LINKED, MODE_DLSYM or MODE_PROCADDR"
#endif

static void resolve(void) {
    driver = dlopen("libcuda.so.1", RTLD_NOW);
    if (!driver) { printf("dlopen_failed=%s\n", dlerror()); exit(90); }
#if defined(MODE_PROCADDR)
    p_getProc = dlsym(driver, "cuGetProcAddress_v2");
    if (!p_getProc) { printf("no_getproc=1\n"); exit(91); }
#endif
    R(p_cuInit, cuInit, cuInit, 2000);
    R(p_retain, cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRetain, 7000);
    R(p_release, cuDevicePrimaryCtxRelease_v2, cuDevicePrimaryCtxRelease, 11000);
    R(p_setCurrent, cuCtxSetCurrent, cuCtxSetCurrent, 4000);
    R(p_getInfo, cuMemGetInfo_v2, cuMemGetInfo, 3020);
    R(p_totalMem, cuDeviceTotalMem_v2, cuDeviceTotalMem, 3020);
    R(p_alloc, cuMemAlloc_v2, cuMemAlloc, 3020);
    R(p_free, cuMemFree_v2, cuMemFree, 3020);
    R(p_pitch, cuMemAllocPitch_v2, cuMemAllocPitch, 3020);
    R(p_managed, cuMemAllocManaged, cuMemAllocManaged, 6000);
    R(p_async, cuMemAllocAsync, cuMemAllocAsync, 11020);
    R(p_freeAsync, cuMemFreeAsync, cuMemFreeAsync, 11020);
    R(p_pool, cuMemAllocFromPoolAsync, cuMemAllocFromPoolAsync, 11020);
    R(p_create, cuMemCreate, cuMemCreate, 10020);
    R(p_releaseHandle, cuMemRelease, cuMemRelease, 10020);
    R(p_array, cuArrayCreate_v2, cuArrayCreate, 3020);
    R(p_array3d, cuArray3DCreate_v2, cuArray3DCreate, 3020);
    R(p_arrayDestroy, cuArrayDestroy, cuArrayDestroy, 2000);
    R(p_ctxCreate, cuCtxCreate_v2, cuCtxCreate, 3020);
    R(p_ctxDestroy, cuCtxDestroy_v2, cuCtxDestroy, 4000);
    R(p_map, cuMemMap, cuMemMap, 10020);
    R(p_unmap, cuMemUnmap, cuMemUnmap, 10020);
    R(p_reserve, cuMemAddressReserve, cuMemAddressReserve, 10020);
    R(p_setAccess, cuMemSetAccess, cuMemSetAccess, 10020);
    R(p_retainHandle, cuMemRetainAllocationHandle, cuMemRetainAllocationHandle, 11000);
    R(p_export, cuMemExportToShareableHandle, cuMemExportToShareableHandle, 10020);
    R(p_import, cuMemImportFromShareableHandle, cuMemImportFromShareableHandle, 10020);
    R(p_mipCreate, cuMipmappedArrayCreate, cuMipmappedArrayCreate, 5000);
    R(p_mipDestroy, cuMipmappedArrayDestroy, cuMipmappedArrayDestroy, 5000);
    R(p_setLimit, cuCtxSetLimit, cuCtxSetLimit, 3010);
    R(p_poolCreate, cuMemPoolCreate, cuMemPoolCreate, 11020);
    R(p_poolDestroy, cuMemPoolDestroy, cuMemPoolDestroy, 11020);
    R(p_defaultPool, cuDeviceGetDefaultMemPool, cuDeviceGetDefaultMemPool, 11020);
    R(p_poolSetAttr, cuMemPoolSetAttribute, cuMemPoolSetAttribute, 11020);
    R(p_poolTrim, cuMemPoolTrimTo, cuMemPoolTrimTo, 11020);
    R(p_graphCreate, cuGraphCreate, cuGraphCreate, 10000);
    R(p_addAllocNode, cuGraphAddMemAllocNode, cuGraphAddMemAllocNode, 11040);
    R(p_instantiate, cuGraphInstantiateWithFlags, cuGraphInstantiateWithFlags, 11040);
    R(p_graphLaunch, cuGraphLaunch, cuGraphLaunch, 10000);
    R(p_graphMemTrim, cuDeviceGraphMemTrim, cuDeviceGraphMemTrim, 11040);
    R(p_execDestroy, cuGraphExecDestroy, cuGraphExecDestroy, 10000);
    R(p_graphDestroy, cuGraphDestroy, cuGraphDestroy, 10000);
    R(p_launch, cuLaunchKernel, cuLaunchKernel, 4000);
}

static int start(int device) {
    CUresult rc = p_cuInit(0);
    printf("init=%d\n", rc);
    if (rc != 0) return rc;
    CUcontext ctx;
    rc = p_retain(&ctx, device);
    if (rc == 0) rc = p_setCurrent(ctx);
    printf("context=%d\n", rc);
    return rc;
}

static size_t free_now(void) {
    size_t f = 0, t = 0;
    p_getInfo(&f, &t);
    return f;
}

static void print_info(void) {
    size_t f = 0, t = 0, tm = 0;
    CUresult rc = p_getInfo(&f, &t);
    CUresult rc2 = p_totalMem(&tm, 0);
    printf("info=%d free=%zu total=%zu totalmem_rc=%d totalmem=%zu\n", rc, f, t, rc2, tm);
}

/* Allocates chunks of `mib` until refusal; returns how many fitted. */
static int fill(unsigned long long mib, CUdeviceptr *ptrs, int max) {
    int n = 0;
    CUresult rc = 0;
    while (n < max && (rc = p_alloc(&ptrs[n], mib * MIB)) == 0) n++;
    printf("filled=%d last_rc=%d\n", n, rc);
    return n;
}

static void report(const char *name, size_t before, size_t after_alloc, size_t after_free, CUresult rc) {
    printf("path=%s rc=%d charged=%lld left=%lld\n", name, rc, (long long)(before - after_alloc),
           (long long)(before - after_free));
}

static void paths(void) {
    size_t b, a;
    CUdeviceptr p; size_t pitch;
    b = free_now(); CUresult rc = p_alloc(&p, 1 * MIB); a = free_now(); p_free(p); report("alloc", b, a, free_now(), rc);
    b = free_now(); rc = p_pitch(&p, &pitch, 1000, 100, 4); a = free_now(); p_free(p); report("pitch", b, a, free_now(), rc);
    b = free_now(); rc = p_managed(&p, 2 * MIB, 1); a = free_now(); p_free(p); report("managed", b, a, free_now(), rc);
    b = free_now(); rc = p_async(&p, 3 * MIB, NULL); a = free_now(); p_freeAsync(p, NULL); report("async", b, a, free_now(), rc);
    b = free_now(); rc = p_pool(&p, 4 * MIB, NULL, NULL); a = free_now(); p_freeAsync(p, NULL); report("pool", b, a, free_now(), rc);
    b = free_now(); rc = p_pool(&p, 4 * MIB, NULL, NULL); a = free_now(); p_free(p); report("pool_sync_free", b, a, free_now(), rc);
    AllocProp prop; memset(&prop, 0, sizeof prop); prop.type = 1; prop.locType = 1; prop.locId = 0;
    unsigned long long h;
    b = free_now(); rc = p_create(&h, 2 * MIB, &prop, 0); a = free_now(); p_releaseHandle(h); report("create", b, a, free_now(), rc);
    prop.locId = 1;
    b = free_now(); rc = p_create(&h, 2 * MIB, &prop, 0); a = free_now(); p_releaseHandle(h); report("create_other_card", b, a, free_now(), rc);
    CUarray arr; ArrayDesc d = {256, 256, 0x20, 4};
    b = free_now(); rc = p_array(&arr, &d); a = free_now(); p_arrayDestroy(arr); report("array", b, a, free_now(), rc);
    Array3DDesc d3 = {64, 64, 64, 0x01, 1, 0};
    b = free_now(); rc = p_array3d(&arr, &d3); a = free_now(); p_arrayDestroy(arr); report("array3d", b, a, free_now(), rc);
    CUcontext primary, extra;
    b = free_now(); rc = p_ctxCreate(&extra, 0, 0);
    a = free_now(); p_ctxDestroy(extra);
    p_retain(&primary, 0); p_setCurrent(primary); p_release(0);
    report("context", b, a, free_now(), rc);
}


/* ---- Virtual memory management scenarios. Each prints
 * `stage=<name> rc=<rc> charged=<bytes> held=<bytes>`: what the interceptor
 * charges beyond the context, and what the (fake) card really holds for
 * this process beyond the context. */
static long long base_free;
static unsigned long long base_used;
static unsigned long long used_on_card(void) {
    unsigned long long (*used)(unsigned) = (unsigned long long (*)(unsigned))dlsym(driver, "fake_cuda_device_used");
    return used ? used(0) : 0;
}
static void stage(const char *name, CUresult rc) {
    printf("stage=%s rc=%d charged=%lld held=%lld\n", name, rc, base_free - (long long)free_now(),
           (long long)(used_on_card() - base_used));
}
static AllocProp device_prop(int device) {
    AllocProp prop; memset(&prop, 0, sizeof prop);
    prop.type = 1; prop.locType = 1; prop.locId = device;
    return prop;
}
typedef struct { unsigned locType; int locId; unsigned flags; } AccessDesc;
static CUresult create_and_map(CUdeviceptr va, size_t bytes, unsigned long long *h) {
    AllocProp prop = device_prop(0);
    CUresult rc = p_create(h, bytes, &prop, 0);
    if (rc) return rc;
    rc = p_map(va, bytes, 0, *h, 0);
    if (rc) return rc;
    AccessDesc access = {1, 0, 3};
    return p_setAccess(va, bytes, &access, 1);
}

static void vmm(const char *which) {
    base_free = (long long)free_now();
    base_used = used_on_card();
    const size_t seg = 64 * MIB;
    CUdeviceptr va = 0;
    unsigned long long h[16];
    CUresult rc;
    if (!strcmp(which, "escape")) {
        /* vectorAddMMAP's pattern: the mapping keeps the memory alive after
         * the handle is released. Loop until refused (at most 16). */
        int n = 0;
        for (; n < 16; n++) {
            rc = p_reserve(&va, 4 * seg, 0, 0, 0);
            if (!rc) rc = create_and_map(va, 4 * seg, &h[0]);
            if (rc) break;
            p_releaseHandle(h[0]);
        }
        printf("vmm_mapped=%d last_rc=%d\n", n, rc);
        stage("after_release_loop", rc);
    } else if (!strcmp(which, "sleep")) {
        /* vLLM's sleep mode: create+map into a reserved range, later
         * unmap+release keeping the range, then create+map again. */
        rc = p_reserve(&va, 4 * seg, 0, 0, 0);
        for (int i = 0; i < 4 && !rc; i++) rc = create_and_map(va + i * seg, seg, &h[i]);
        stage("awake", rc);
        for (int i = 0; i < 4; i++) { rc = p_unmap(va + i * seg, seg); if (!rc) rc = p_releaseHandle(h[i]); }
        stage("asleep", rc);
        for (int i = 0; i < 4 && !rc; i++) rc = create_and_map(va + i * seg, seg, &h[i]);
        stage("awake_again", rc);
        for (int i = 0; i < 4; i++) { p_unmap(va + i * seg, seg); p_releaseHandle(h[i]); }
        stage("freed", 0);
    } else if (!strcmp(which, "expandable")) {
        /* PyTorch's expandable segments: one reserved range, segments mapped
         * in as it grows, handles kept; pieces unmapped and released. */
        rc = p_reserve(&va, 16 * seg, 0, 0, 0);
        for (int i = 0; i < 8 && !rc; i++) rc = create_and_map(va + i * seg, seg, &h[i]);
        stage("grown", rc);
        /* One unmap over four adjacent mappings, then their handles. */
        rc = p_unmap(va + 2 * seg, 4 * seg);
        stage("unmapped_middle_handles_kept", rc);
        for (int i = 2; i < 6; i++) p_releaseHandle(h[i]);
        stage("middle_released", 0);
        /* A retained handle needs one more release. */
        unsigned long long again = 0;
        rc = p_retainHandle(&again, (void *)(va + seg / 2));
        printf("retained_same=%d\n", again == h[0]);
        p_releaseHandle(h[0]);
        p_unmap(va, seg);
        stage("retained_after_unmap", rc);
        p_releaseHandle(again);
        stage("retained_released", 0);
        /* An unmap the driver refuses (not a mapping's start) changes nothing. */
        rc = p_unmap(va + 6 * seg + MIB, seg);
        stage("refused_unmap", rc);
        for (int i = 6; i < 8; i++) { p_releaseHandle(h[i]); }
        stage("released_while_mapped", 0);
        rc = p_unmap(va + 1 * seg, seg);
        p_releaseHandle(h[1]);
        rc = p_unmap(va + 6 * seg, 2 * seg);
        stage("all_gone", rc);
    } else if (!strcmp(which, "import")) {
        /* Our own allocation exported and imported back: the import keeps
         * the memory alive after the original handle and mapping are gone. */
        CUdeviceptr va2 = 0;
        unsigned long long shared = 0, imported = 0;
        rc = p_reserve(&va, 2 * seg, 0, 0, 0);
        if (!rc) rc = p_reserve(&va2, 2 * seg, 0, 0, 0);
        if (!rc) rc = create_and_map(va, 2 * seg, &h[0]);
        if (!rc) rc = p_export(&shared, h[0], 1, 0);
        if (!rc) rc = p_import(&imported, (void *)(uintptr_t)shared, 1);
        stage("imported", rc);
        if (!rc) rc = p_map(va2, 2 * seg, 0, imported, 0);
        stage("import_mapped", rc);
        p_unmap(va, 2 * seg);
        p_releaseHandle(h[0]);
        stage("exporter_gone", rc);
        p_releaseHandle(imported);
        stage("import_released_still_mapped", 0);
        rc = p_unmap(va2, 2 * seg);
        stage("import_gone", rc);
    } else if (!strcmp(which, "mipmap")) {
        void *mip = NULL;
        Array3DDesc d = {1024, 1024, 0, 0x20, 4, 0}; /* float4, 1024x1024, 5 levels */
        rc = p_mipCreate(&mip, &d, 5);
        stage("mipmap_created", rc);
        rc = p_mipDestroy(mip);
        stage("mipmap_destroyed", rc);
    } else if (!strcmp(which, "heap")) {
        rc = p_setLimit(2 /* CU_LIMIT_MALLOC_HEAP_SIZE */, 256 * MIB);
        stage("heap_grown", rc);
        rc = p_setLimit(1 /* CU_LIMIT_PRINTF_FIFO_SIZE */, 17 * MIB);
        stage("fifo_grown", rc);
        rc = p_setLimit(2, 8 * MIB);
        p_setLimit(1, 1 * MIB);
        stage("limits_back", rc);
        rc = p_setLimit(2, 8192 * MIB);
        stage("heap_past_cap", rc);
    } else if (!strcmp(which, "lmem")) {
        /* The fake card holds 4096 threads at once; its stack starts at
         * 1 KiB per thread. A kernel with 64 KiB per thread grows it by
         * 63 KiB x 4096 = 252 MiB at its launch. */
        void *(*kernel)(unsigned long long) = (void *(*)(unsigned long long))dlsym(driver, "fake_cuda_kernel");
        void *(*opaque)(unsigned long long) = (void *(*)(unsigned long long))dlsym(driver, "fake_cuda_kernel_opaque");
        void *small = kernel(512), *big = kernel(64 * 1024), *huge = kernel(2 * 1024 * 1024);
        rc = p_launch(small, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL);
        stage("lmem_small", rc);
        rc = p_launch(big, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL);
        stage("lmem_big", rc);
        rc = p_launch(big, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL);
        stage("lmem_big_again", rc);
        /* 2 MiB per thread: 8 GiB, past a 4 GiB cap. */
        rc = p_launch(huge, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL);
        stage("lmem_past_cap", rc);
        /* A kernel the driver does not describe: charged after its launch
         * from the stack the driver then reports. */
        /* A library kernel (CUkernel, as the runtime launches): only
         * cuKernelGetAttribute describes it; still refused beforehand. */
        void *(*library)(unsigned long long) = (void *(*)(unsigned long long))dlsym(driver, "fake_cuda_library_kernel");
        rc = p_launch(library(2 * 1024 * 1024), 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL);
        stage("lmem_library_past_cap", rc);
        rc = p_launch(opaque(128 * 1024), 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL);
        stage("lmem_opaque", rc);
        rc = p_setLimit(0 /* CU_LIMIT_STACK_SIZE */, 1024);
        stage("lmem_stack_set_back", rc);
        rc = p_setLimit(0, 3 * 1024 * 1024);
        stage("lmem_stack_set_past_cap", rc);
    } else if (!strcmp(which, "load")) {
        /* Lazy loading: the fake driver takes FAKE_CUDA_LOAD_MIB for a
         * function's code at its first launch, through no allocation call. */
        void *(*kernel)(unsigned long long) = (void *(*)(unsigned long long))dlsym(driver, "fake_cuda_kernel");
        int (*unload)(void *) = (int (*)(void *))dlsym(driver, "fake_cuda_unload_kernel");
        void *a = kernel(0), *b = kernel(0);
        rc = p_launch(a, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL);
        stage("load_first", rc);
        rc = p_launch(a, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL);
        stage("load_again", rc);
        rc = p_launch(b, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL);
        stage("load_second", rc);
        CUdeviceptr chunk;
        int n = 0;
        while (n < 64 && (rc = p_alloc(&chunk, 64 * MIB)) == 0) n++;
        printf("load_chunks=%d\n", n);
        stage("load_full", rc);
        /* The driver gives one function's code back: the next allocation
         * that would be refused finds the room. */
        printf("unloaded=%d\n", unload(b));
        rc = p_alloc(&chunk, 64 * MIB);
        stage("load_after_unload", rc);
    } else if (!strcmp(which, "pool")) {
        /* A pool on card 1 while card 0's context is current: its
         * allocations count against card 1's cap, not card 0's. */
        void *pool = NULL, *pool1 = NULL;
        struct { unsigned allocType, handleTypes, locType; int locId; void *win32; size_t max; unsigned char pad[56]; } props;
        memset(&props, 0, sizeof props);
        props.allocType = 1; props.locType = 1; props.locId = 1;
        CUdeviceptr p1, p2, p3;
        rc = p_poolCreate(&pool, &props);
        CUresult a = p_pool(&p1, 64 * MIB, pool, NULL);
        CUresult b = p_pool(&p2, 64 * MIB, pool, NULL);
        printf("pool_first=%d pool_second=%d\n", a, b);
        stage("pool_on_card1", rc);
        p_freeAsync(p1, NULL);
        if (!b) p_freeAsync(p2, NULL);
        rc = p_defaultPool(&pool1, 1);
        CUresult c = p_pool(&p3, 64 * MIB, pool1, NULL);
        printf("default_pool_card1=%d\n", c);
        if (!c) p_freeAsync(p3, NULL);
        p_poolDestroy(pool);
    } else if (!strcmp(which, "retain")) {
        /* A pool that keeps freed memory (release threshold raised, as
         * PyTorch's cudaMallocAsync backend does): what it keeps is held. */
        void *pool = NULL, *dp = NULL;
        struct { unsigned allocType, handleTypes, locType; int locId; void *win32; size_t max; unsigned char pad[56]; } props;
        memset(&props, 0, sizeof props);
        props.allocType = 1; props.locType = 1; props.locId = 0;
        unsigned long long keep_all = ~0ULL, keep_64m = 64 * MIB;
        CUdeviceptr a, b, c;
        rc = p_poolCreate(&pool, &props);
        if (!rc) rc = p_poolSetAttr(pool, 4 /* RELEASE_THRESHOLD */, &keep_all);
        if (!rc) rc = p_pool(&a, 256 * MIB, pool, NULL);
        if (!rc) rc = p_freeAsync(a, NULL);
        stage("freed_into_pool", rc);
        rc = p_pool(&b, 128 * MIB, pool, NULL);
        stage("reused_from_pool", rc);
        p_freeAsync(b, NULL);
        rc = p_alloc(&c, 800 * MIB);
        stage("plain_alloc_past_retained", rc);
        if (!rc) p_free(c);
        rc = p_poolTrim(pool, 0);
        stage("trimmed", rc);
        p_poolSetAttr(pool, 4, &keep_64m);
        rc = p_pool(&a, 256 * MIB, pool, NULL);
        p_freeAsync(a, NULL);
        stage("threshold_64m", rc);
        rc = p_poolDestroy(pool);
        stage("destroyed", rc);
        p_defaultPool(&dp, 0);
        p_poolSetAttr(dp, 4, &keep_all);
        rc = p_async(&a, 128 * MIB, NULL);
        p_freeAsync(a, NULL);
        stage("default_pool_retains", rc);
        rc = p_poolTrim(dp, 0);
        stage("default_pool_trimmed", rc);
    } else if (!strcmp(which, "graph")) {
        /* A graph with a 512 MiB allocation node: the driver reserves its
         * memory when the graph is launched, and keeps it until trimmed. */
        void *graph = NULL, *exec = NULL, *node = NULL;
        unsigned char params[120];
        memset(params, 0, sizeof params);
        *(unsigned *)(params + 0) = 1;  /* poolProps.allocType: pinned */
        *(unsigned *)(params + 8) = 1;  /* poolProps.location.type: device */
        *(int *)(params + 12) = 0;      /* poolProps.location.id */
        *(size_t *)(params + 104) = 512 * MIB; /* bytesize */
        rc = p_graphCreate(&graph, 0);
        if (!rc) rc = p_addAllocNode(&node, graph, NULL, 0, params);
        if (!rc) rc = p_instantiate(&exec, graph, 0);
        stage("graph_built", rc);
        rc = p_graphLaunch(exec, NULL);
        stage("graph_launched", rc);
        CUdeviceptr c;
        rc = p_alloc(&c, 512 * MIB);
        stage("plain_alloc_past_graph", rc);
        if (!rc) p_free(c);
        rc = p_graphMemTrim(0);
        stage("graph_trimmed", rc);
        p_execDestroy(exec);
        p_graphDestroy(graph);
    } else if (!strcmp(which, "host")) {
        AllocProp prop; memset(&prop, 0, sizeof prop);
        prop.type = 1; prop.locType = 2; /* CU_MEM_LOCATION_TYPE_HOST */
        rc = p_create(&h[0], seg, &prop, 0);
        stage("host_created", rc);
        p_releaseHandle(h[0]);
    }
}

/* CLIENT_LATE_FREE=<MiB>: an allocation freed by an exit handler registered
 * before cuInit, so it runs after the interceptor's own exit handler (as a
 * C++ static destructor or a framework's atexit cleanup can). */
static CUdeviceptr late;
static void late_free(void) { p_free(late); }

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    resolve();
    const char *late_mib = getenv("CLIENT_LATE_FREE");
    if (late_mib) atexit(late_free);
    const char *scenario = argc > 1 ? argv[1] : "info";
    int device = getenv("CLIENT_DEVICE") ? atoi(getenv("CLIENT_DEVICE")) : 0;
    if (start(device) != 0) return 3;
    if (late_mib) printf("late_alloc=%d\n", p_alloc(&late, strtoull(late_mib, NULL, 10) * MIB));
    static CUdeviceptr ptrs[4096];
    if (!strcmp(scenario, "info")) {
        print_info();
    } else if (!strcmp(scenario, "fill")) {
        int n = fill(strtoull(argv[2], NULL, 10), ptrs, 4096);
        for (int i = 0; i < n; i++) p_free(ptrs[i]);
        print_info();
    } else if (!strcmp(scenario, "fillhold")) {
        fill(strtoull(argv[2], NULL, 10), ptrs, 4096);
        sleep(atoi(argv[3]));
    } else if (!strcmp(scenario, "exact")) {
        size_t f = free_now();
        CUdeviceptr big, one;
        CUresult rc1 = p_alloc(&big, f);
        CUresult rc2 = p_alloc(&one, 1);
        printf("free_before=%zu whole=%d one_more=%d free_at_cap=%zu\n", f, rc1, rc2, free_now());
        p_free(big);
        CUresult rc3 = p_alloc(&big, f);
        printf("again=%d\n", rc3);
    } else if (!strcmp(scenario, "paths")) {
        paths();
    } else if (!strcmp(scenario, "vmm")) {
        vmm(argv[2]);
    } else if (!strcmp(scenario, "hold")) {
        CUresult rc = p_alloc(&ptrs[0], strtoull(argv[2], NULL, 10) * MIB);
        printf("held=%d\n", rc);
        sleep(60);
    } else if (!strcmp(scenario, "try")) {
        CUresult rc = p_alloc(&ptrs[0], strtoull(argv[2], NULL, 10) * MIB);
        printf("try=%d\n", rc);
    } else if (!strcmp(scenario, "unknownfree")) {
        size_t b = free_now();
        CUresult rc = p_free(0xdead0000ULL);
        printf("unknown_free=%d unchanged=%d\n", rc, b == free_now());
    } else if (!strcmp(scenario, "fork")) {
        p_alloc(&ptrs[0], 100 * MIB);
        pid_t child = fork();
        if (child == 0) {
            CUcontext ctx;
            p_retain(&ctx, 0);
            CUresult rc = p_alloc(&ptrs[1], 50 * MIB);
            printf("child_alloc=%d\n", rc);
            _exit(0); /* leaves its 50 MiB charged: reclaimed when it is gone */
        }
        int status;
        waitpid(child, &status, 0);
        size_t room = 1024 * MIB - 64 * MIB - 100 * MIB;
        CUresult rc1 = p_alloc(&ptrs[2], room);
        CUresult rc2 = p_alloc(&ptrs[3], 1 * MIB);
        printf("parent_rest=%d parent_one_more=%d\n", rc1, rc2);
#if defined(MODE_PROCADDR)
    } else if (!strcmp(scenario, "procaddr")) {
        void *fn = NULL; int st = -1;
        CUresult (*ptsz)(CUdeviceptr *, size_t, void *) = NULL;
        p_getProc("cuMemAllocAsync", (void **)&ptsz, 12000, 2 /* PER_THREAD */, &st);
        unsigned long long (*calls)(void) = dlsym(driver, "fake_cuda_ptsz_calls");
        size_t b = free_now();
        CUdeviceptr p;
        CUresult rc = ptsz(&p, 8 * MIB, NULL);
        printf("ptsz_rc=%d ptsz_calls=%llu ptsz_charged=%zu\n", rc, calls(), b - free_now());
        Dl_info info;
        dladdr((void *)ptsz, &info);
        printf("ptsz_in=%s\n", strstr(info.dli_fname, "libtessera_cuda") ? "tessera" : info.dli_fname);
        p_getProc("cuMemAlloc", &fn, 2000, 0, &st);
        printf("legacy_untouched=%d\n", fn == dlsym(driver, "cuMemAlloc"));
        p_getProc("cuGetProcAddress", &fn, 12000, 0, &st);
        dladdr(fn, &info);
        printf("getproc_in=%s\n", strstr(info.dli_fname, "libtessera_cuda") ? "tessera" : info.dli_fname);
        p_getProc("cuCtxGetDevice", &fn, 2000, 0, &st);
        dladdr(fn, &info);
        printf("unhooked_in=%s\n", strstr(info.dli_fname, "libtessera_cuda") ? "tessera" : "driver");
#endif
    } else {
        printf("unknown scenario %s\n", scenario);
        return 2;
    }
    return 0;
}
