#include "vector_kernels.hpp"

#include <algorithm>

#include "cpu_features.hpp"
#include "dtype_codec.hpp"

// acc + w * (t - b) must be three separately rounded operations to match the fp32 reference;
// a fused multiply-add would round once and differ in the last bit.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace sku {

namespace {

// Each loop is written once as an always-inline body; the AVX2 and AVX-512 wrappers only give
// the compiler a wider target to vectorise the same code for.

inline __attribute__((always_inline)) void low_rank_body(const Term& term, uint64_t cols,
                                                         uint64_t e0, size_t n, float* d) {
    std::fill(d, d + n, 0.0f);
    size_t i = 0;
    while (i < n) {
        const uint64_t e = e0 + i;
        const uint64_t row = e / cols;
        const uint64_t col = e % cols;
        const size_t len = size_t(std::min<uint64_t>(n - i, cols - col));
        const float* left = term.left + row * term.rank;
        for (uint64_t k = 0; k < term.rank; ++k) {
            const float lk = left[k];
            const float* right = term.right + k * cols + col;
            float* out = d + i;
            for (size_t j = 0; j < len; ++j) out[j] += lk * right[j];
        }
        i += len;
    }
}

// out = b + w * (t - b) for one tuned model of the base's dtype, with the same operations as
// the general path.
template <DType D, DType O>
inline __attribute__((always_inline)) void fused_body(const char* base, const char* tuned, float w,
                                                      char* out, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        const float b = load<D>(base, i);
        const float diff = load<D>(tuned, i) - b;
        const float scaled = w * diff;
        store<O>(out, i, b + scaled);
    }
}

#ifdef SKU_X86_DISPATCH
__attribute__((target("avx2"))) void low_rank_avx2(const Term& term, uint64_t cols, uint64_t e0,
                                                   size_t n, float* d) {
    low_rank_body(term, cols, e0, n, d);
}

__attribute__((target("avx512f,avx512bw"))) void low_rank_avx512(const Term& term, uint64_t cols,
                                                                 uint64_t e0, size_t n, float* d) {
    low_rank_body(term, cols, e0, n, d);
}

template <DType D, DType O>
__attribute__((target("avx2"))) void fused_avx2(const char* base, const char* tuned, float w,
                                                char* out, size_t n) {
    fused_body<D, O>(base, tuned, w, out, n);
}

template <DType D, DType O>
__attribute__((target("avx512f,avx512bw"))) void fused_avx512(const char* base, const char* tuned,
                                                              float w, char* out, size_t n) {
    fused_body<D, O>(base, tuned, w, out, n);
}
#endif

template <DType D, DType O>
void fused_one_term(const char* base, const char* tuned, float w, char* out, size_t n) {
#ifdef SKU_X86_DISPATCH
    const int level = vector_level();
    if (level == kAvx512) return fused_avx512<D, O>(base, tuned, w, out, n);
    if (level == kAvx2) return fused_avx2<D, O>(base, tuned, w, out, n);
#endif
    fused_body<D, O>(base, tuned, w, out, n);
}

template <DType D>
bool fused_to(DType out_dtype, const char* base, const char* tuned, float w, char* out, size_t n) {
    switch (out_dtype) {
        case DType::BF16: fused_one_term<D, DType::BF16>(base, tuned, w, out, n); return true;
        case DType::F16: fused_one_term<D, DType::F16>(base, tuned, w, out, n); return true;
        case DType::F32: fused_one_term<D, DType::F32>(base, tuned, w, out, n); return true;
        default: return false;
    }
}

}  // namespace

void low_rank_block(const Term& term, uint64_t cols, uint64_t e0, size_t n, float* d) {
#ifdef SKU_X86_DISPATCH
    const int level = vector_level();
    if (level == kAvx512) return low_rank_avx512(term, cols, e0, n, d);
    if (level == kAvx2) return low_rank_avx2(term, cols, e0, n, d);
#endif
    low_rank_body(term, cols, e0, n, d);
}

bool try_fused(const Job& job, const char* base, const char* tuned, char* out, size_t n) {
    if (job.terms.size() != 1) return false;
    const Term& term = job.terms[0];
    if (term.kind != Term::Kind::Dense || term.dtype != job.base_dtype) return false;
    const float w = float(term.weight);
    switch (job.base_dtype) {
        case DType::BF16: return fused_to<DType::BF16>(job.out_dtype, base, tuned, w, out, n);
        case DType::F16: return fused_to<DType::F16>(job.out_dtype, base, tuned, w, out, n);
        case DType::F32: return fused_to<DType::F32>(job.out_dtype, base, tuned, w, out, n);
        default: return false;
    }
}

}  // namespace sku
