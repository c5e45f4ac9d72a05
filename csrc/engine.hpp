// The streaming task-vector engine: writes one safetensors file whose tensors are
// base + sum_i w_i * delta_i, read and written in bounded chunks by a pool of threads.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "safetensors.hpp"

namespace sku {

// One summand of a tensor job, applied in list order:
//   Dense:   acc += weight * (tuned - base), tuned read from inputs[input] at `offset`;
//   LowRank: acc += weight * (left @ right), left [rows, rank] and right [rank, cols] row-major
//            fp32 in memory (owned by the caller), rows * cols = numel.
struct Term {
    enum class Kind { Dense, LowRank };
    Kind kind = Kind::Dense;
    double weight = 0.0;
    size_t input = 0;     // Dense
    uint64_t offset = 0;  // Dense: absolute byte offset in the input file
    DType dtype = DType::F32;
    const float* left = nullptr;  // LowRank
    const float* right = nullptr;
    uint64_t rank = 0;
};

struct Job {
    std::string name;
    uint64_t numel = 0;
    uint64_t cols = 1;  // row length, used by low-rank terms
    size_t base_input = 0;
    uint64_t base_offset = 0;  // absolute byte offset in the base file
    DType base_dtype = DType::F32;
    DType out_dtype = DType::F32;
    uint64_t out_offset = 0;  // absolute byte offset in the output file
    // acc starts at base_weight * base (1: the base itself); -λ scales a LoRA B matrix
    double base_weight = 1.0;
    std::vector<Term> terms;
};

struct Plan {
    std::string out_path;  // created exclusively; must not exist
    std::string header;    // the output's first bytes: 8-byte length + JSON header
    std::vector<std::string> inputs;
    std::vector<Job> jobs;
    unsigned threads = 1;
};

// Called from the calling thread every ~100 ms with the output bytes written so far; returning
// false cancels the run (combine then throws EngineError("cancelled")).
using Progress = std::function<bool(uint64_t)>;

// Writes plan.out_path and fsyncs it. Arithmetic runs in fp32 (fp64 when the base or the output
// is F64) and each result is rounded once, to nearest even, to the output dtype; NaN stays NaN.
void combine(const Plan& plan, const Progress& progress);

}  // namespace sku
