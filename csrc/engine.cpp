// Chunk execution: the plan's tensors are cut into work items of about 1 MiB of base data, in
// output order, and a pool of threads computes (or copies) each item from memory-mapped input
// chunks into a per-thread buffer and writes it at its place in the output file.
#include "engine.hpp"

#include <algorithm>
#include <atomic>
#include <exception>
#include <new>
#include <string>
#include <system_error>
#include <type_traits>

#include "dtype_codec.hpp"
#include "error.hpp"
#include "io.hpp"
#include "thread_pool.hpp"
#include "vector_kernels.hpp"

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

// Output bytes of a work item, reused across items by each worker.
struct Scratch {
    std::vector<char> out;
};

struct Context {
    const std::vector<File>& inputs;
    const File& out;
};

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
        if (job.terms.size() == 1 && job.base_weight == 1.0)
            done = try_fused(job, base, term_maps[0].data(), out, n);
    }
    const T base_weight = T(job.base_weight);

    T b[kBlock], acc[kBlock], t[kBlock];
    float d[kBlock];
    for (size_t i0 = 0; i0 < n && !done; i0 += kBlock) {
        const size_t m = std::min(kBlock, n - i0);
        decode<T>(job.base_dtype, base + i0 * base_size, b, m);
        if (job.base_weight == 1.0) {
            std::copy(b, b + m, acc);
        } else {
            for (size_t j = 0; j < m; ++j) acc[j] = base_weight * b[j];
        }
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
    if (job.terms.empty() && job.out_dtype == job.base_dtype && job.base_weight == 1.0) {
        copy_chunk(ctx, job, e0, n);
    } else if (job.base_dtype == DType::F64 || job.out_dtype == DType::F64) {
        compute_chunk<double>(ctx, job, e0, n, s);
    } else {
        compute_chunk<float>(ctx, job, e0, n, s);
    }
}

void check_job(const Job& job, size_t n_inputs) {
    const std::string where = "tensor \"" + job.name + "\"";
    const bool arithmetic =
        !job.terms.empty() || job.out_dtype != job.base_dtype || job.base_weight != 1.0;
    if (arithmetic && (!dtype_is_arithmetic(job.base_dtype) || !dtype_is_arithmetic(job.out_dtype)))
        throw format_error(where + ": arithmetic on dtype " + dtype_name(job.base_dtype) + " -> " +
                           dtype_name(job.out_dtype) + " is not supported");
    if (job.base_input >= n_inputs) throw internal_error(where + ": base input index out of range");
    for (const Term& term : job.terms) {
        if (term.kind == Term::Kind::Dense) {
            if (term.input >= n_inputs) throw internal_error(where + ": input index out of range");
            if (!dtype_is_arithmetic(term.dtype))
                throw format_error(where + ": a tuned tensor has dtype " + dtype_name(term.dtype));
        } else if (job.cols == 0 || job.numel % job.cols != 0 || term.left == nullptr ||
                   term.right == nullptr) {
            throw format_error(where + ": low-rank term does not match the tensor's shape");
        }
    }
}

struct WorkItem {
    size_t job;
    uint64_t first;  // first element
    size_t count;
};

// What to tell the user when an allocation fails: each thread holds about a chunk of every input
// mapped and a chunk of output, so fewer threads need less memory.
std::string out_of_memory(const Plan& plan, const std::string& while_doing) {
    const std::string what = plan.out_path + ": out of memory while " + while_doing;
    if (plan.threads <= 1)
        return what + " (about 1 MiB of every input and of the output at a time); free some memory";
    return what + " with " + std::to_string(plan.threads) +
           " threads (each holds about 1 MiB of every input and of the output); run with fewer "
           "threads (threads=1, --threads 1) or free some memory";
}

void run_plan(const Plan& plan, const Progress& progress) {
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
    const unsigned threads = plan.threads == 0 ? 1 : plan.threads;
    std::vector<Scratch> scratch(std::min<size_t>(threads, std::max<size_t>(items.size(), 1)));
    std::atomic<uint64_t> done{0};
    const bool finished = parallel_for(
        items.size(), threads,
        [&](size_t i, unsigned worker) {
            const WorkItem& item = items[i];
            const Job& job = plan.jobs[item.job];
            try {
                run_chunk(ctx, job, item.first, item.count, scratch[worker]);
            } catch (const std::bad_alloc&) {
                throw memory_error(out_of_memory(plan, "computing tensor \"" + job.name + "\""));
            }
            done.fetch_add(item.count * dtype_size(job.out_dtype));
        },
        [&] { return progress(done.load()); });
    if (!finished) throw cancelled_error("cancelled");
    out.sync_and_close();
    progress(done.load());
}

}  // namespace

void combine(const Plan& plan, const Progress& progress) {
    try {
        run_plan(plan, progress);
    } catch (const EngineError&) {
        throw;
    } catch (const std::bad_alloc&) {
        throw memory_error(out_of_memory(plan, "planning the output"));
    } catch (const std::system_error& e) {  // a worker thread could not be started
        throw memory_error(plan.out_path + ": cannot start " + std::to_string(plan.threads) +
                           " threads (" + e.what() + "); run with fewer threads");
    } catch (const std::exception& e) {
        throw internal_error(plan.out_path + ": " + e.what());
    }
}

}  // namespace sku
