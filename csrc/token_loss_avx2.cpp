// The token-loss row kernel compiled for AVX2 (two 8-lane registers per 16-lane vector), FMA
// and F16C. Only the functions between the target pragmas use these instructions: the inline
// helpers of the headers are included before the pragmas and stay portable, so the linker
// cannot pick a copy of them that needs these instructions on a CPU without. token_loss.cpp
// calls this only where vector_level() says it may.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "dtype_codec.hpp"
#include "token_loss_kernels.hpp"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace sku {
namespace token_loss_avx2 {
#include "lanes_float.inc"
#include "lanes_avx2.inc"
#include "lane_math.inc"
#include "token_loss_row.inc"
}  // namespace token_loss_avx2

void token_loss_row_avx2(const TokenLossArgs& args, int64_t row) {
    token_loss_avx2::token_loss_row(args, row);
}

}  // namespace sku

#pragma GCC pop_options
#endif
