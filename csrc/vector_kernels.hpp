// The engine's inner loops, each compiled for the portable target and for AVX2 and AVX-512 and
// picked at run time (cpu_features.hpp). The variants give identical bits: the same IEEE
// operations in the same order, and no fused multiply-add contraction.
#pragma once

#include <cstddef>
#include <cstdint>

#include "engine.hpp"

namespace sku {

// d[0..n) = (term.left @ term.right) at the flat elements [e0, e0 + n) of a tensor with rows of
// `cols` elements; fp32, summed over the rank in order.
void low_rank_block(const Term& term, uint64_t cols, uint64_t e0, size_t n, float* d);

// out[0..n) = base + w * (tuned - base) in one pass, when `job` is the common case: one dense
// term whose dtype is the base's, fp32 arithmetic, a BF16/F16/F32 output. Returns false (and
// writes nothing) when the job needs the general path.
bool try_fused(const Job& job, const char* base, const char* tuned, char* out, size_t n);

}  // namespace sku
