/* Test client for a container with several cards: reaches the (fake) driver
 * through dlopen+dlsym and runs a scenario named on the command line,
 * printing `key=value` lines for tests/multi_card.rs.
 *   cards            per ordinal: UUID, cuMemGetInfo in its context, cuDeviceTotalMem
 *   fill O MIB       on ordinal O, MIB chunks until refused; then 1 GiB on every other ordinal
 *   hold O MIB       MIB on ordinal O, then sleep (for reading the shared region)
 *   peer             cuDeviceCanAccessPeer both ways, cuCtxEnablePeerAccess twice,
 *                    and where the entry points live (driver or interceptor) */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext;
#define MIB (1024ULL * 1024ULL)

static CUresult (*p_init)(unsigned);
static CUresult (*p_count)(int *);
static CUresult (*p_uuid)(unsigned char *, int);
static CUresult (*p_retain)(CUcontext *, int);
static CUresult (*p_setCurrent)(CUcontext);
static CUresult (*p_getInfo)(size_t *, size_t *);
static CUresult (*p_totalMem)(size_t *, int);
static CUresult (*p_alloc)(CUdeviceptr *, size_t);
static CUresult (*p_canPeer)(int *, int, int);
static CUresult (*p_enablePeer)(CUcontext, unsigned);
static void *driver;

static void *need(const char *name) {
    void *f = dlsym(driver, name);
    if (!f) { printf("missing=%s\n", name); exit(91); }
    return f;
}

static const char *owner(void *f) {
    Dl_info info;
    if (!dladdr(f, &info) || !info.dli_fname) return "unknown";
    return strstr(info.dli_fname, "libtessera_cuda") ? "tessera" : "driver";
}

static CUcontext contexts[16];

static CUresult use(int ordinal) {
    CUresult rc = 0;
    if (!contexts[ordinal]) rc = p_retain(&contexts[ordinal], ordinal);
    if (rc == 0) rc = p_setCurrent(contexts[ordinal]);
    return rc;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    driver = dlopen("libcuda.so.1", RTLD_NOW);
    if (!driver) { printf("dlopen_failed=1\n"); return 90; }
    p_init = need("cuInit"); p_count = need("cuDeviceGetCount"); p_uuid = need("cuDeviceGetUuid");
    p_retain = need("cuDevicePrimaryCtxRetain"); p_setCurrent = need("cuCtxSetCurrent");
    p_getInfo = need("cuMemGetInfo_v2"); p_totalMem = need("cuDeviceTotalMem_v2");
    p_alloc = need("cuMemAlloc_v2"); p_canPeer = need("cuDeviceCanAccessPeer");
    p_enablePeer = need("cuCtxEnablePeerAccess");
    CUresult rc = p_init(0);
    int count = 0;
    p_count(&count);
    printf("init=%d count=%d\n", rc, count);
    if (rc != 0) return 3;
    const char *scenario = argc > 1 ? argv[1] : "cards";
    if (!strcmp(scenario, "cards")) {
        for (int d = 0; d < count; d++) {
            unsigned char u[16];
            p_uuid(u, d);
            size_t f = 0, t = 0, tm = 0;
            CUresult ctx = use(d);
            CUresult info = ctx == 0 ? p_getInfo(&f, &t) : ctx;
            p_totalMem(&tm, d);
            printf("card=%d uuid_last=%02x context=%d free=%zu total=%zu totalmem=%zu\n", d, u[15], ctx, f, t, tm);
            (void)info;
        }
    } else if (!strcmp(scenario, "fill")) {
        int ordinal = atoi(argv[2]);
        unsigned long long mib = strtoull(argv[3], NULL, 10);
        printf("context=%d\n", use(ordinal));
        int n = 0;
        CUdeviceptr p;
        while (n < 4096 && (rc = p_alloc(&p, mib * MIB)) == 0) n++;
        printf("filled=%d last_rc=%d\n", n, rc);
        for (int d = 0; d < count; d++) {
            if (d == ordinal) continue;
            CUresult ctx = use(d);
            CUresult a = ctx == 0 ? p_alloc(&p, 1024 * MIB) : ctx;
            size_t f = 0, t = 0;
            p_getInfo(&f, &t);
            printf("other=%d alloc=%d free=%zu total=%zu\n", d, a, f, t);
        }
    } else if (!strcmp(scenario, "hold")) {
        int ordinal = atoi(argv[2]);
        CUdeviceptr p;
        CUresult ctx = use(ordinal);
        CUresult a = ctx == 0 ? p_alloc(&p, strtoull(argv[3], NULL, 10) * MIB) : ctx;
        printf("held=%d\n", a);
        sleep(60);
    } else if (!strcmp(scenario, "peer")) {
        int a = -1, b = -1;
        CUresult r1 = p_canPeer(&a, 0, 1), r2 = p_canPeer(&b, 1, 0);
        use(1);
        use(0);
        CUresult e1 = p_enablePeer(contexts[1], 0);
        CUresult e2 = p_enablePeer(contexts[1], 0);
        printf("can_rc=%d,%d can=%d,%d enable=%d again=%d\n", r1, r2, a, b, e1, e2);
        printf("can_in=%s enable_in=%s\n", owner((void *)p_canPeer), owner((void *)p_enablePeer));
        void *(*getProc)(const char *, void **, int, unsigned long long, int *) = need("cuGetProcAddress_v2");
        void *fn = NULL; int st = -1;
        ((CUresult (*)(const char *, void **, int, unsigned long long, int *))getProc)("cuCtxEnablePeerAccess", &fn, 12000, 0, &st);
        printf("proc_enable_in=%s\n", fn ? owner(fn) : "none");
    } else {
        printf("unknown scenario %s\n", scenario);
        return 2;
    }
    return 0;
}
