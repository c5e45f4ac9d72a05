// Argument checks, the choice of vector variant and the threads over rows for token_loss.hpp;
// the row kernel itself is token_loss_row.inc.
#include "token_loss.hpp"

#include <stdexcept>
#include <string>

#include "cpu_features.hpp"
#include "thread_pool.hpp"
#include "token_loss_kernels.hpp"

namespace sku {

namespace {

bool is_logit_dtype(DType dtype) {
    return dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16;
}

void check_buffer(const char* what, const void* data, DType dtype, int64_t stride, int64_t vocab) {
    if (data == nullptr) throw std::invalid_argument(std::string(what) + " is a null pointer");
    if (!is_logit_dtype(dtype))
        throw std::invalid_argument(std::string(what) + " must be F32, BF16 or F16, got " +
                                    dtype_name(dtype));
    if (stride < vocab)
        throw std::invalid_argument(std::string(what) + " row stride " + std::to_string(stride) +
                                    " is smaller than the vocabulary size " +
                                    std::to_string(vocab));
}

void check_args(const TokenLossArgs& args) {
    if (args.rows <= 0 || args.vocab <= 0)
        throw std::invalid_argument("token_loss_rows needs rows > 0 and vocab > 0, got rows=" +
                                    std::to_string(args.rows) +
                                    " vocab=" + std::to_string(args.vocab));
    check_buffer("logits", args.logits, args.logits_dtype, args.logits_stride, args.vocab);
    if (args.ref != nullptr)
        check_buffer("ref_logits", args.ref, args.ref_dtype, args.ref_stride, args.vocab);
    if (args.grad != nullptr)
        check_buffer("grad", args.grad, args.grad_dtype, args.grad_stride, args.vocab);
    if (args.labels == nullptr || args.ce_weight == nullptr || args.kl_weight == nullptr ||
        args.loss == nullptr)
        throw std::invalid_argument("labels, ce_weight, kl_weight and loss must not be null");
    // a counted row with a CE weight reads logits[label]: it must be in the row
    for (int64_t r = 0; r < args.rows; ++r) {
        const int64_t y = args.labels[r];
        if (y != args.ignore_index && args.ce_weight[r] != 0.0f && (y < 0 || y >= args.vocab))
            throw std::invalid_argument(
                "labels[" + std::to_string(r) + "] = " + std::to_string(y) + " is outside [0, " +
                std::to_string(args.vocab) + ") on a counted row with a non-zero CE weight "
                "(ignore_index is " + std::to_string(args.ignore_index) + ")");
    }
}

TokenLossRowFn row_kernel() {
#if defined(__GNUC__) && defined(__x86_64__)
    const int level = vector_level();
    if (level == kAvx512) return token_loss_row_avx512;
    if (level == kAvx2) return token_loss_row_avx2;
#endif
    return token_loss_row_portable;
}

}  // namespace

void token_loss_rows(const TokenLossArgs& args) {
    check_args(args);
    const TokenLossRowFn kernel = row_kernel();
    parallel_for(size_t(args.rows), args.threads == 0 ? 1 : args.threads,
                 [&](size_t row, unsigned) { kernel(args, int64_t(row)); });
}

}  // namespace sku
