// Which vector instruction set the hot loops run with, chosen once at run time: the portable
// build is SSE2 only, and the AVX2 / AVX-512 variants of a loop are compiled beside it with
// function target attributes. Every variant does the same IEEE operations in the same order,
// so they give the same bits; tests check that by forcing each level in turn.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define SKU_X86_DISPATCH 1
#endif

namespace sku {

// 0: portable (scalar or SSE2), 1: AVX2 with FMA and F16C, 2: AVX-512 F+BW.
enum VectorLevel : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The best level this CPU supports, capped by the environment variable SKU_FAST_ISA
// (sse2|avx2), read once; or the level last set with set_vector_level.
int vector_level();

// Test hook: run at min(level, what the CPU supports) from now on; returns the level in effect.
int set_vector_level(int level);

}  // namespace sku
