// The token-loss row kernel for any CPU: 16 lanes in plain C++ (the compiler vectorises what
// it can for the baseline target), the reference the vector variants are compared with.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "dtype_codec.hpp"
#include "token_loss_kernels.hpp"

namespace sku {
namespace token_loss_portable {
#include "lanes_float.inc"
#include "lanes_portable.inc"
#include "lane_math.inc"
#include "token_loss_row.inc"
}  // namespace token_loss_portable

void token_loss_row_portable(const TokenLossArgs& args, int64_t row) {
    token_loss_portable::token_loss_row(args, row);
}

}  // namespace sku
