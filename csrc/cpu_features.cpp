#include "cpu_features.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

namespace sku {

namespace {

int detect_level() {
#ifdef SKU_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return kAvx512;
    // every AVX2 CPU has FMA and F16C; the token-loss kernels use them
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return kAvx2;
#endif
    return kPortable;
}

int initial_level() {
    int level = detect_level();
    const char* cap = std::getenv("SKU_FAST_ISA");
    if (cap != nullptr && std::strcmp(cap, "sse2") == 0) level = kPortable;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) level = std::min<int>(level, kAvx2);
    return level;
}

// -1 until first asked; relaxed loads are enough, a level is valid whichever thread set it.
std::atomic<int> g_level{-1};

}  // namespace

int vector_level() {
    int level = g_level.load(std::memory_order_relaxed);
    if (level < 0) {
        level = initial_level();
        g_level.store(level, std::memory_order_relaxed);
    }
    return level;
}

int set_vector_level(int level) {
    level = std::clamp(level, int(kPortable), detect_level());
    g_level.store(level, std::memory_order_relaxed);
    return level;
}

}  // namespace sku
