// The fused token loss of docs/design.md §3 on the CPU, row by row, torch-free:
//
//     loss_r = a_r * CE(z, y_r) + b_r * KL(softmax(z') || softmax(z))
//     grad_r = a_r * (p - onehot(y_r)) + b_r * (p - p')
//
// Two passes over each row with an online log-sum-exp, fp32 arithmetic whatever the storage,
// the KL in the difference form (exact at p ~ p'), vectorised for AVX2 / AVX-512 (chosen at
// run time, the same bits as the portable build) and threaded over rows.
#pragma once

#include <cstdint>

#include "dtype.hpp"

namespace sku {

// Plain pointers and sizes; rows are `vocab` contiguous elements, `*_stride` elements apart.
struct TokenLossArgs {
    int64_t rows = 0;
    int64_t vocab = 0;
    const void* logits = nullptr;  // [rows, vocab] F32, BF16 or F16
    DType logits_dtype = DType::F32;
    int64_t logits_stride = 0;
    const int64_t* labels = nullptr;  // [rows]
    const void* ref = nullptr;        // [rows, vocab] reference logits, or null (no KL)
    DType ref_dtype = DType::F32;
    int64_t ref_stride = 0;
    const float* ce_weight = nullptr;  // [rows] a
    const float* kl_weight = nullptr;  // [rows] b
    int64_t ignore_index = -100;
    void* grad = nullptr;  // [rows, vocab] out, or null; may be the logits buffer itself
    DType grad_dtype = DType::F32;
    int64_t grad_stride = 0;
    float* loss = nullptr;  // [rows] out
    unsigned threads = 1;
};

// Counting rule (that of sku_fast.reference.token_loss_rows_chunked and the Triton kernel): a
// row with label == ignore_index, or with a = b = 0, gets loss 0 and a zero gradient. Without
// reference logits the KL term is absent whatever b is. A row whose CE weight is not zero needs
// a label in [0, vocab); a KL-only row's label is never read.
//
// Throws std::invalid_argument (Python: ValueError) with the numbers for a bad argument, before
// anything is written. Runs on `threads` threads, the calling one included.
void token_loss_rows(const TokenLossArgs& args);

}  // namespace sku
