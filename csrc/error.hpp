// The one exception type of the native engine. Its message names the file, the tensor and the
// problem; bindings.cpp maps it onto sku_fast.errors.CheckpointError.
#pragma once

#include <stdexcept>
#include <string>

namespace sku {

class EngineError : public std::runtime_error {
   public:
    explicit EngineError(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace sku
