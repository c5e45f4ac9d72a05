// safetensors headers: reading and strict validation (the rules of the reference implementation,
// huggingface/safetensors `Metadata::validate`, plus a refusal of duplicate JSON keys).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace sku {

enum class DType { Bool, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

// Bytes per element.
size_t dtype_size(DType dtype);
// "BF16" -> DType::BF16; false when the name is unknown.
bool dtype_from_name(const std::string& name, DType& out);
const char* dtype_name(DType dtype);
// Floating dtypes the engine does arithmetic on (F8 formats are copied, never combined).
bool dtype_is_arithmetic(DType dtype);

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
