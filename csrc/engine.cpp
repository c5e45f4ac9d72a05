#include "engine.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>

#include "error.hpp"
#include "io.hpp"

// acc + w * (t - b) must be three separately rounded operations to match the fp32 reference;
// a fused multiply-add would round once and differ in the last bit.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace sku {

namespace {

// Bytes of base tensor read per work item, and elements converted per inner block (fits in L1).
constexpr uint64_t kChunkBytes = 1u << 20;
constexpr size_t kBlock = 2048;

inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
    uint32_t x = float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x0040u);  // quiet NaN
    return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float f16_to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) return bits_float(sign | float_bits(float(mantissa) * 0x1p-24f));
    return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// Round to nearest even (after F. Giesen's float_to_half_fast3_rtne).
inline uint16_t float_to_f16(float f) {
    uint32_t x = float_bits(f);
    uint16_t sign = uint16_t((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN
    if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
    if (ax < 0x38800000u)  // below 2^-14: a subnormal half, an integer multiple of 2^-24
        return uint16_t(sign | uint16_t(std::nearbyint(bits_float(ax) * 0x1p24f)));
    ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias the exponent and round
    return uint16_t(sign | (ax >> 13));
}

template <typename T>
void decode(DType dtype, const char* raw, T* out, size_t n) {
    switch (dtype) {
        case DType::F32: {
            const float* p = reinterpret_cast<const float*>(raw);
            for (size_t i = 0; i < n; ++i) out[i] = T(p[i]);
            break;
        }
        case DType::BF16: {
            const uint16_t* p = reinterpret_cast<const uint16_t*>(raw);
            for (size_t i = 0; i < n; ++i) out[i] = T(bf16_to_float(p[i]));
            break;
        }
        case DType::F16: {
            const uint16_t* p = reinterpret_cast<const uint16_t*>(raw);
            for (size_t i = 0; i < n; ++i) out[i] = T(f16_to_float(p[i]));
            break;
        }
        case DType::F64: {
            const double* p = reinterpret_cast<const double*>(raw);
            for (size_t i = 0; i < n; ++i) out[i] = T(p[i]);
            break;
        }
        default: throw EngineError("internal: decode of a non-float dtype");
    }
}

template <typename T>
void encode(DType dtype, const T* in, char* raw, size_t n) {
    switch (dtype) {
        case DType::F32: {
            float* p = reinterpret_cast<float*>(raw);
            for (size_t i = 0; i < n; ++i) p[i] = float(in[i]);
            break;
        }
        case DType::BF16: {
            uint16_t* p = reinterpret_cast<uint16_t*>(raw);
            for (size_t i = 0; i < n; ++i) p[i] = float_to_bf16(float(in[i]));
            break;
        }
        case DType::F16: {
            uint16_t* p = reinterpret_cast<uint16_t*>(raw);
            for (size_t i = 0; i < n; ++i) p[i] = float_to_f16(float(in[i]));
            break;
        }
        case DType::F64: {
            double* p = reinterpret_cast<double*>(raw);
            for (size_t i = 0; i < n; ++i) p[i] = double(in[i]);
            break;
        }
        default: throw EngineError("internal: encode to a non-float dtype");
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
// Hot loops are also compiled for wider vectors and chosen at run time: the portable build is
// SSE2 only, which makes the bf16 conversions 2.5x (AVX2) to 4x (AVX-512) slower. Results are
// identical: the same IEEE operations in the same order, no contraction.
#define SKU_X86_DISPATCH 1
// 2: AVX-512, 1: AVX2, 0: portable. SKU_FAST_ISA=sse2|avx2 caps it (to test every variant).
int vector_level() {
    __builtin_cpu_init();
    int level = 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
        level = 2;
    } else if (__builtin_cpu_supports("avx2")) {
        level = 1;
    }
    const char* cap = std::getenv("SKU_FAST_ISA");
    if (cap != nullptr && std::strcmp(cap, "sse2") == 0) level = 0;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) level = std::min(level, 1);
    return level;
}
#endif

// d[0..n) = (left @ right) at flat elements [e0, e0 + n), summed over the rank in fp32, k in order.
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

#ifdef SKU_X86_DISPATCH
__attribute__((target("avx2"))) void low_rank_avx2(const Term& term, uint64_t cols, uint64_t e0,
                                                   size_t n, float* d) {
    low_rank_body(term, cols, e0, n, d);
}

__attribute__((target("avx512f,avx512bw"))) void low_rank_avx512(const Term& term, uint64_t cols,
                                                                 uint64_t e0, size_t n, float* d) {
    low_rank_body(term, cols, e0, n, d);
}
#endif

void low_rank_block(const Term& term, uint64_t cols, uint64_t e0, size_t n, float* d) {
#ifdef SKU_X86_DISPATCH
    static const int level = vector_level();
    if (level == 2) return low_rank_avx512(term, cols, e0, n, d);
    if (level == 1) return low_rank_avx2(term, cols, e0, n, d);
#endif
    low_rank_body(term, cols, e0, n, d);
}

// Output bytes of a work item, reused across items by each worker.
struct Scratch {
    std::vector<char> out;
};

struct Context {
    const std::vector<File>& inputs;
    const File& out;
};

template <DType D>
inline float load(const char* raw, size_t i) {
    if constexpr (D == DType::F32) {
        float v;
        std::memcpy(&v, raw + 4 * i, 4);
        return v;
    } else {
        uint16_t h;
        std::memcpy(&h, raw + 2 * i, 2);
        return D == DType::BF16 ? bf16_to_float(h) : f16_to_float(h);
    }
}

template <DType O>
inline void store(char* raw, size_t i, float v) {
    if constexpr (O == DType::F32) {
        std::memcpy(raw + 4 * i, &v, 4);
    } else {
        const uint16_t h = O == DType::BF16 ? float_to_bf16(v) : float_to_f16(v);
        std::memcpy(raw + 2 * i, &h, 2);
    }
}

// out = b + w * (t - b) in one pass over the chunk: the common case (one tuned model of the
// base's dtype, fp32 arithmetic), with the same operations as the general path.
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
    static const int level = vector_level();
    if (level == 2) return fused_avx512<D, O>(base, tuned, w, out, n);
    if (level == 1) return fused_avx2<D, O>(base, tuned, w, out, n);
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

// False when the job needs the general path.
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

template <typename T>
void compute_chunk(const Context& ctx, const Job& job, uint64_t e0, size_t n, Scratch& s) {
    const size_t base_size = dtype_size(job.base_dtype);
    const size_t out_size = dtype_size(job.out_dtype);
    const std::string what = "tensor \"" + job.name + "\"";
    const Mapping base_map(ctx.inputs[job.base_input], job.base_offset + e0 * base_size,
                           n * base_size, what);
    std::vector<Mapping> term_maps;
    term_maps.reserve(job.terms.size());
    for (const Term& term : job.terms) {
        const size_t size = dtype_size(term.dtype);
        if (term.kind == Term::Kind::Dense)
            term_maps.emplace_back(ctx.inputs[term.input], term.offset + e0 * size, n * size, what);
        else
            term_maps.emplace_back();
    }
    s.out.resize(n * out_size);
    char* out = s.out.data();
    const char* base = base_map.data();
    bool done = false;
    if constexpr (std::is_same_v<T, float>) {
        if (job.terms.size() == 1) done = try_fused(job, base, term_maps[0].data(), out, n);
    }

    T b[kBlock], acc[kBlock], t[kBlock];
    float d[kBlock];
    for (size_t i0 = 0; i0 < n && !done; i0 += kBlock) {
        const size_t m = std::min(kBlock, n - i0);
        decode<T>(job.base_dtype, base + i0 * base_size, b, m);
        std::copy(b, b + m, acc);
        for (size_t k = 0; k < job.terms.size(); ++k) {
            const Term& term = job.terms[k];
            const T w = T(term.weight);
            if (term.kind == Term::Kind::Dense) {
                decode<T>(term.dtype, term_maps[k].data() + i0 * dtype_size(term.dtype), t, m);
                for (size_t j = 0; j < m; ++j) {
                    const T diff = t[j] - b[j];
                    const T scaled = w * diff;
                    acc[j] = acc[j] + scaled;
                }
            } else {
                low_rank_block(term, job.cols, e0 + i0, m, d);
                for (size_t j = 0; j < m; ++j) {
                    const T scaled = w * T(d[j]);
                    acc[j] = acc[j] + scaled;
                }
            }
        }
        encode<T>(job.out_dtype, acc, out + i0 * out_size, m);
    }
    ctx.out.write_at(out, n * out_size, job.out_offset + e0 * out_size, what);
}

void copy_chunk(const Context& ctx, const Job& job, uint64_t e0, size_t n) {
    const size_t size = dtype_size(job.base_dtype);
    const std::string what = "tensor \"" + job.name + "\"";
    const Mapping base(ctx.inputs[job.base_input], job.base_offset + e0 * size, n * size, what);
    ctx.out.write_at(base.data(), n * size, job.out_offset + e0 * size, what);
}

void run_chunk(const Context& ctx, const Job& job, uint64_t e0, size_t n, Scratch& s) {
    if (job.terms.empty() && job.out_dtype == job.base_dtype) {
        copy_chunk(ctx, job, e0, n);
    } else if (job.base_dtype == DType::F64 || job.out_dtype == DType::F64) {
        compute_chunk<double>(ctx, job, e0, n, s);
    } else {
        compute_chunk<float>(ctx, job, e0, n, s);
    }
}

void check_job(const Job& job, size_t n_inputs) {
    const std::string where = "tensor \"" + job.name + "\"";
    const bool arithmetic = !job.terms.empty() || job.out_dtype != job.base_dtype;
    if (arithmetic && (!dtype_is_arithmetic(job.base_dtype) || !dtype_is_arithmetic(job.out_dtype)))
        throw EngineError(where + ": arithmetic on dtype " + dtype_name(job.base_dtype) + " -> " +
                          dtype_name(job.out_dtype) + " is not supported");
    if (job.base_input >= n_inputs) throw EngineError(where + ": base input index out of range");
    for (const Term& term : job.terms) {
        if (term.kind == Term::Kind::Dense) {
            if (term.input >= n_inputs) throw EngineError(where + ": input index out of range");
            if (!dtype_is_arithmetic(term.dtype))
                throw EngineError(where + ": a tuned tensor has dtype " + dtype_name(term.dtype));
        } else if (job.cols == 0 || job.numel % job.cols != 0 || term.left == nullptr ||
                   term.right == nullptr) {
            throw EngineError(where + ": low-rank term does not match the tensor's shape");
        }
    }
}

struct WorkItem {
    size_t job;
    uint64_t first;  // first element
    size_t count;
};

}  // namespace

void combine(const Plan& plan, const Progress& progress) {
    for (const Job& job : plan.jobs) check_job(job, plan.inputs.size());

    std::vector<File> inputs;
    inputs.reserve(plan.inputs.size());
    for (const std::string& path : plan.inputs) {
        inputs.emplace_back(path, O_RDONLY);
        ::posix_fadvise(inputs.back().fd(), 0, 0, POSIX_FADV_SEQUENTIAL);
    }
    File out(plan.out_path, O_WRONLY | O_CREAT | O_EXCL);
    out.write_at(plan.header.data(), plan.header.size(), 0, "the header");

    // Work items in output order, so reads and writes stay mostly sequential.
    std::vector<WorkItem> items;
    for (size_t j = 0; j < plan.jobs.size(); ++j) {
        const Job& job = plan.jobs[j];
        const uint64_t per_chunk = std::max<uint64_t>(1, kChunkBytes / dtype_size(job.base_dtype));
        for (uint64_t e = 0; e < job.numel; e += per_chunk)
            items.push_back({j, e, size_t(std::min(per_chunk, job.numel - e))});
    }

    const Context ctx{inputs, out};
    std::atomic<size_t> next{0};
    std::atomic<uint64_t> done{0};
    std::atomic<bool> stop{false};
    std::mutex mutex;
    std::condition_variable finished_cv;
    size_t finished = 0;
    std::string error;

    const size_t n_threads =
        std::max<size_t>(1, std::min<size_t>(plan.threads == 0 ? 1 : plan.threads, items.size()));
    std::vector<std::thread> workers;
    for (size_t w = 0; w < n_threads; ++w) {
        workers.emplace_back([&] {
            Scratch scratch;
            try {
                while (!stop.load(std::memory_order_relaxed)) {
                    const size_t i = next.fetch_add(1);
                    if (i >= items.size()) break;
                    const WorkItem& item = items[i];
                    const Job& job = plan.jobs[item.job];
                    run_chunk(ctx, job, item.first, item.count, scratch);
                    done.fetch_add(item.count * dtype_size(job.out_dtype));
                }
            } catch (const std::exception& e) {
                std::lock_guard<std::mutex> lock(mutex);
                if (error.empty()) error = e.what();
                stop = true;
            }
            std::lock_guard<std::mutex> lock(mutex);
            ++finished;
            finished_cv.notify_all();
        });
    }

    bool cancelled = false;
    {
        std::unique_lock<std::mutex> lock(mutex);
        while (finished < n_threads) {
            finished_cv.wait_for(lock, std::chrono::milliseconds(100));
            if (finished < n_threads && !cancelled) {
                lock.unlock();
                if (!progress(done.load())) {
                    cancelled = true;
                    stop = true;
                }
                lock.lock();
            }
        }
    }
    for (auto& worker : workers) worker.join();
    if (!error.empty()) throw EngineError(error);
    if (cancelled) throw EngineError("cancelled");
    out.sync_and_close();
    progress(done.load());
}

}  // namespace sku
