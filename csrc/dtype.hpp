// The safetensors dtypes: one table, the single source of truth for names, sizes and which
// dtypes the engine does arithmetic on (Python reads it as _C.DTYPES and _C.FLOAT_DTYPES).
#pragma once

#include <cstddef>
#include <string>

namespace sku {

enum class DType {
    Bool, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64
};

struct DTypeInfo {
    DType dtype;
    const char* name;  // as written in a safetensors header
    size_t size;       // bytes per element
    bool arithmetic;   // a float dtype the engine combines (F8 formats are copied, never combined)
};

inline constexpr DTypeInfo kDTypes[] = {
    {DType::Bool, "BOOL", 1, false},
    {DType::U8, "U8", 1, false},
    {DType::I8, "I8", 1, false},
    {DType::F8_E5M2, "F8_E5M2", 1, false},
    {DType::F8_E4M3, "F8_E4M3", 1, false},
    {DType::I16, "I16", 2, false},
    {DType::U16, "U16", 2, false},
    {DType::F16, "F16", 2, true},
    {DType::BF16, "BF16", 2, true},
    {DType::I32, "I32", 4, false},
    {DType::U32, "U32", 4, false},
    {DType::F32, "F32", 4, true},
    {DType::F64, "F64", 8, true},
    {DType::I64, "I64", 8, false},
    {DType::U64, "U64", 8, false},
};

// The table's entry of `dtype` (every enumerator has one).
const DTypeInfo& dtype_info(DType dtype);

inline size_t dtype_size(DType dtype) { return dtype_info(dtype).size; }
inline const char* dtype_name(DType dtype) { return dtype_info(dtype).name; }
inline bool dtype_is_arithmetic(DType dtype) { return dtype_info(dtype).arithmetic; }

// "BF16" -> DType::BF16; false when the name is unknown.
bool dtype_from_name(const std::string& name, DType& out);

}  // namespace sku
