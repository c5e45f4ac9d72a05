// safetensors headers: reading and strict validation (the rules of the reference implementation,
// huggingface/safetensors `Metadata::validate`, plus a refusal of duplicate JSON keys).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dtype.hpp"

namespace sku {

struct TensorInfo {
    std::string name;
    DType dtype;
    std::vector<uint64_t> shape;
    uint64_t begin;  // byte offsets relative to the data section
    uint64_t end;
};

struct Header {
    uint64_t data_start = 0;  // absolute file offset of the data section (8 + header length)
    uint64_t file_size = 0;
    std::vector<std::pair<std::string, std::string>> metadata;  // "__metadata__", file order
    std::vector<TensorInfo> tensors;                            // sorted by data offset
};

constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;

// Reads and validates the header of `path`; throws EngineError naming the file, the tensor and
// the problem.
Header read_header(const std::string& path);

}  // namespace sku
