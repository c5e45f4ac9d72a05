// The per-row token-loss kernel, compiled once per instruction set (token_loss_portable.cpp,
// token_loss_avx2.cpp, token_loss_avx512.cpp from the same token_loss_row.inc); internal to
// token_loss.cpp, which validates the arguments and picks one.
#pragma once

#include <cstdint>

#include "token_loss.hpp"

namespace sku {

using TokenLossRowFn = void (*)(const TokenLossArgs& args, int64_t row);

void token_loss_row_portable(const TokenLossArgs& args, int64_t row);
#if defined(__GNUC__) && defined(__x86_64__)
void token_loss_row_avx2(const TokenLossArgs& args, int64_t row);
void token_loss_row_avx512(const TokenLossArgs& args, int64_t row);
#endif

}  // namespace sku
