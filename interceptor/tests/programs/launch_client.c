/* Launch-path test client: reaches the (fake) driver's launch entry points
 * one of three ways (MODE_LINKED, MODE_DLSYM, MODE_PROCADDR, as
 * cuda_client.c) and runs a scenario:
 *   all N          every launch path N times (grid 4x2x1, block 32x2x1)
 *   loop SECONDS   cuLaunchKernel until SECONDS pass; per-100 ms counts
 * Prints key=value lines for the Rust tests. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef void *CUcontext;
typedef struct { unsigned gx, gy, gz, bx, by, bz, shared; void *stream; void *attrs; unsigned nattrs; } LaunchConfig;
typedef CUresult (*LaunchFn)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **);
typedef CUresult (*CoopFn)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **);
typedef CUresult (*ExFn)(const LaunchConfig *, void *, void **, void **);
typedef CUresult (*GraphFn)(void *, void *);

static CUresult (*p_init)(unsigned);
static CUresult (*p_retain)(CUcontext *, int);
static CUresult (*p_setCurrent)(CUcontext);
static LaunchFn p_launch, p_launch_ptsz;
static CoopFn p_coop, p_coop_ptsz;
static ExFn p_ex, p_ex_ptsz;
static GraphFn p_graph, p_graph_ptsz;
static void *driver;

#if defined(MODE_LINKED)
CUresult cuInit(unsigned);
CUresult cuDevicePrimaryCtxRetain(CUcontext *, int);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuLaunchKernel(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **);
CUresult cuLaunchKernel_ptsz(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **);
CUresult cuLaunchCooperativeKernel(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **);
CUresult cuLaunchCooperativeKernel_ptsz(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **);
CUresult cuLaunchKernelEx(const LaunchConfig *, void *, void **, void **);
CUresult cuLaunchKernelEx_ptsz(const LaunchConfig *, void *, void **, void **);
CUresult cuGraphLaunch(void *, void *);
CUresult cuGraphLaunch_ptsz(void *, void *);
#define R(var, export, base, version, flags) var = (void *)&export
#elif defined(MODE_DLSYM)
#define R(var, export, base, version, flags) var = dlsym(driver, #export)
#elif defined(MODE_PROCADDR)
static CUresult (*p_getProc)(const char *, void **, int, unsigned long long, int *);
#define R(var, export, base, version, flags) do { int st = -1; \
    if (p_getProc(#base, (void **)&var, version, flags, &st) != 0) var = NULL; } while (0)
#else
#error "define MODE_LINKED, MODE_DLSYM or MODE_PROCADDR"
#endif

static void resolve(void) {
    driver = dlopen("libcuda.so.1", RTLD_NOW);
    if (!driver) { fprintf(stderr, "no driver: %s\n", dlerror()); exit(2); }
#if defined(MODE_PROCADDR)
    p_getProc = dlsym(driver, "cuGetProcAddress_v2");
#endif
    R(p_init, cuInit, cuInit, 2000, 0);
    R(p_retain, cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRetain, 7000, 0);
    R(p_setCurrent, cuCtxSetCurrent, cuCtxSetCurrent, 4000, 0);
    R(p_launch, cuLaunchKernel, cuLaunchKernel, 4000, 0);
    R(p_launch_ptsz, cuLaunchKernel_ptsz, cuLaunchKernel, 4000, 2);
    R(p_coop, cuLaunchCooperativeKernel, cuLaunchCooperativeKernel, 9000, 0);
    R(p_coop_ptsz, cuLaunchCooperativeKernel_ptsz, cuLaunchCooperativeKernel, 9000, 2);
    R(p_ex, cuLaunchKernelEx, cuLaunchKernelEx, 11060, 0);
    R(p_ex_ptsz, cuLaunchKernelEx_ptsz, cuLaunchKernelEx, 11060, 2);
    R(p_graph, cuGraphLaunch, cuGraphLaunch, 10000, 0);
    R(p_graph_ptsz, cuGraphLaunch_ptsz, cuGraphLaunch, 10000, 2);
    if (!p_init || !p_retain || !p_setCurrent || !p_launch || !p_launch_ptsz || !p_coop ||
        !p_coop_ptsz || !p_ex || !p_ex_ptsz || !p_graph || !p_graph_ptsz) {
        fprintf(stderr, "missing entry point\n");
        exit(2);
    }
}

static unsigned long long fake_counter(const char *name) {
    unsigned long long (*f)(void) = (unsigned long long (*)(void))dlsym(driver, name);
    return f ? f() : 0;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    resolve();
    CUcontext ctx;
    int rc = p_init(0);
    if (rc) { printf("init_rc=%d\n", rc); return 0; }
    if ((rc = p_retain(&ctx, 0)) || (rc = p_setCurrent(ctx))) { printf("ctx_rc=%d\n", rc); return 1; }
    const char *scenario = argc > 1 ? argv[1] : "all";
    LaunchConfig cfg = {4, 2, 1, 32, 2, 1, 0, 0, 0, 0};
    if (!strcmp(scenario, "all")) {
        int n = argc > 2 ? atoi(argv[2]) : 10, failed = 0;
        for (int i = 0; i < n; i++) {
            failed += p_launch(0, 4, 2, 1, 32, 2, 1, 0, 0, 0, 0) != 0;
            failed += p_launch_ptsz(0, 4, 2, 1, 32, 2, 1, 0, 0, 0, 0) != 0;
            failed += p_coop(0, 4, 2, 1, 32, 2, 1, 0, 0, 0) != 0;
            failed += p_coop_ptsz(0, 4, 2, 1, 32, 2, 1, 0, 0, 0) != 0;
            failed += p_ex(&cfg, 0, 0, 0) != 0;
            failed += p_ex_ptsz(&cfg, 0, 0, 0) != 0;
            failed += p_graph(0, 0) != 0;
            failed += p_graph_ptsz(0, 0) != 0;
        }
        printf("failed=%d\n", failed);
    } else if (!strcmp(scenario, "loop")) {
        double seconds = argc > 2 ? atof(argv[2]) : 1, start = now_s();
        long windows[1000] = {0};
        int nw = (int)(seconds * 10);
        if (nw > 1000) nw = 1000;
        for (double t; (t = now_s() - start) < seconds;) {
            if (p_launch(0, 4, 2, 1, 32, 2, 1, 0, 0, 0, 0) != 0) { printf("launch_failed=1\n"); return 1; }
            int w = (int)(t * 10);
            if (w < nw) windows[w]++;
        }
        printf("windows=");
        for (int i = 0; i < nw; i++) printf(i ? ",%ld" : "%ld", windows[i]);
        printf("\n");
    }
    printf("launches=%llu threads=%llu ptsz=%llu\n", fake_counter("fake_cuda_launches"),
           fake_counter("fake_cuda_launched_threads"), fake_counter("fake_cuda_ptsz_calls"));
    return 0;
}
