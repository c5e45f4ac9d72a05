// The one exception type of the native core. Its message names the file, the tensor and the
// problem; its kind says what sort of problem it is, so that callers can react to it (retry
// an I/O error, lower the thread count on a memory error) without parsing the message.
// bindings.cpp maps it onto sku_fast._C.EngineError (a sku_fast.errors.CheckpointError) with a
// `kind` attribute holding error_kind_name(kind).
#pragma once

#include <stdexcept>
#include <string>

namespace sku {

enum class ErrorKind {
    Format,     // an input is not a valid checkpoint (header, sizes, dtypes, truncated data)
    Io,         // the operating system refused a read, write, open, fsync...
    Memory,     // an allocation failed
    Cancelled,  // the caller asked to stop
    Internal,   // a broken invariant: a bug in sku-fast
};

inline const char* error_kind_name(ErrorKind kind) {
    switch (kind) {
        case ErrorKind::Format: return "format";
        case ErrorKind::Io: return "io";
        case ErrorKind::Memory: return "memory";
        case ErrorKind::Cancelled: return "cancelled";
        case ErrorKind::Internal: break;
    }
    return "internal";
}

class EngineError : public std::runtime_error {
   public:
    EngineError(ErrorKind kind, const std::string& message)
        : std::runtime_error(message), kind_(kind) {}

    ErrorKind kind() const noexcept { return kind_; }

   private:
    ErrorKind kind_;
};

// Shorthands for the throw sites: `throw format_error(path + ": ...")`.
inline EngineError format_error(const std::string& message) {
    return EngineError(ErrorKind::Format, message);
}
inline EngineError io_error(const std::string& message) {
    return EngineError(ErrorKind::Io, message);
}
inline EngineError memory_error(const std::string& message) {
    return EngineError(ErrorKind::Memory, message);
}
inline EngineError cancelled_error(const std::string& message) {
    return EngineError(ErrorKind::Cancelled, message);
}
inline EngineError internal_error(const std::string& message) {
    return EngineError(ErrorKind::Internal, message);
}

}  // namespace sku
