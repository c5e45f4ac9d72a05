// The token-loss row kernel compiled for AVX-512 (one register per 16-lane vector). Only the
// functions between the target pragmas use these instructions: the inline helpers of the
// headers are included before the pragmas and stay portable, so the linker cannot pick a
// copy of them that needs these instructions on a CPU without. token_loss.cpp calls this
// only where vector_level() says it may.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "dtype_codec.hpp"
#include "token_loss_kernels.hpp"

#if defined(__GNUC__) && defined(__x86_64__)
// GCC 12 warns inside its own AVX-512 intrinsics (their _mm512_undefined_* placeholders,
// GCC bug 105593, fixed in 13); nothing of ours is uninitialised.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,fma,f16c")

namespace sku {
namespace token_loss_avx512 {
#include "lanes_float.inc"
#include "lanes_avx512.inc"
#include "lane_math.inc"
#include "token_loss_row.inc"
}  // namespace token_loss_avx512

void token_loss_row_avx512(const TokenLossArgs& args, int64_t row) {
    token_loss_avx512::token_loss_row(args, row);
}

}  // namespace sku

#pragma GCC pop_options
#endif
