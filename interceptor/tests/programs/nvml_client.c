/* Test client: reads memory the way nvidia-smi does, through NVML reached
 * by dlopen+dlsym (MODE_DLSYM) or by linking (MODE_LINKED). */
#include <dlfcn.h>
#include <stdio.h>

typedef int nvmlReturn_t;
typedef void *nvmlDevice_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;

#if defined(MODE_LINKED)
nvmlReturn_t nvmlInit_v2(void);
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned, nvmlDevice_t *);
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t, nvmlMemory_t *);
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t, nvmlMemory_v2_t *);
#endif

int main(void) {
    nvmlReturn_t (*init)(void);
    nvmlReturn_t (*byIndex)(unsigned, nvmlDevice_t *);
    nvmlReturn_t (*info)(nvmlDevice_t, nvmlMemory_t *);
    nvmlReturn_t (*info2)(nvmlDevice_t, nvmlMemory_v2_t *);
#if defined(MODE_LINKED)
    init = nvmlInit_v2; byIndex = nvmlDeviceGetHandleByIndex_v2;
    info = nvmlDeviceGetMemoryInfo; info2 = nvmlDeviceGetMemoryInfo_v2;
#else
    void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!lib) { printf("dlopen_failed\n"); return 1; }
    init = dlsym(lib, "nvmlInit_v2"); byIndex = dlsym(lib, "nvmlDeviceGetHandleByIndex_v2");
    info = dlsym(lib, "nvmlDeviceGetMemoryInfo"); info2 = dlsym(lib, "nvmlDeviceGetMemoryInfo_v2");
#endif
    init();
    for (unsigned i = 0; i < 2; i++) {
        nvmlDevice_t dev;
        byIndex(i, &dev);
        nvmlMemory_t m;
        nvmlMemory_v2_t m2;
        m2.version = (unsigned)(sizeof m2) | (2u << 24);
        int rc = info(dev, &m);
        int rc2 = info2(dev, &m2);
        printf("card=%u rc=%d total=%llu used=%llu free=%llu rc2=%d total2=%llu reserved2=%llu used2=%llu free2=%llu\n",
               i, rc, m.total, m.used, m.free, rc2, m2.total, m2.reserved, m2.used, m2.free);
    }
    return 0;
}
