#include "dtype.hpp"

#include "error.hpp"

namespace sku {

const DTypeInfo& dtype_info(DType dtype) {
    for (const auto& info : kDTypes)
        if (info.dtype == dtype) return info;
    throw internal_error("internal: unknown dtype");
}

bool dtype_from_name(const std::string& name, DType& out) {
    for (const auto& info : kDTypes) {
        if (name == info.name) {
            out = info.dtype;
            return true;
        }
    }
    return false;
}

}  // namespace sku
