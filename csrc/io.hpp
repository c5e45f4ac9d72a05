// POSIX file helpers: an owning descriptor and exact positional reads/writes that retry short
// transfers and turn failures into EngineError naming the file.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "error.hpp"

namespace sku {

inline std::string errno_text(int code) { return std::strerror(code); }

class File {
   public:
    File() = default;
    File(const std::string& path, int flags, mode_t mode = 0644) : path_(path) {
        do {
            fd_ = ::open(path.c_str(), flags | O_CLOEXEC, mode);
        } while (fd_ < 0 && errno == EINTR);
        if (fd_ < 0) throw EngineError(path + ": cannot open: " + errno_text(errno));
    }
    File(const File&) = delete;
    File& operator=(const File&) = delete;
    File(File&& other) noexcept : fd_(other.fd_), path_(std::move(other.path_)) { other.fd_ = -1; }
    ~File() {
        if (fd_ >= 0) ::close(fd_);
    }

    int fd() const { return fd_; }
    const std::string& path() const { return path_; }

    uint64_t size() const {
        struct stat st;
        if (::fstat(fd_, &st) != 0) throw EngineError(path_ + ": cannot stat: " + errno_text(errno));
        return uint64_t(st.st_size);
    }

    // Reads exactly n bytes at offset; a short file is reported with `what` (e.g. the tensor).
    void read_at(void* buffer, size_t n, uint64_t offset, const std::string& what) const {
        auto* p = static_cast<char*>(buffer);
        while (n > 0) {
            ssize_t got = ::pread(fd_, p, n, off_t(offset));
            if (got < 0) {
                if (errno == EINTR) continue;
                throw EngineError(path_ + ": reading " + what + ": " + errno_text(errno));
            }
            if (got == 0)
                throw EngineError(path_ + ": reading " + what + ": unexpected end of file at byte " +
                                  std::to_string(offset));
            p += got;
            n -= size_t(got);
            offset += uint64_t(got);
        }
    }

    void write_at(const void* buffer, size_t n, uint64_t offset, const std::string& what) const {
        auto* p = static_cast<const char*>(buffer);
        while (n > 0) {
            ssize_t put = ::pwrite(fd_, p, n, off_t(offset));
            if (put < 0) {
                if (errno == EINTR) continue;
                throw EngineError(path_ + ": writing " + what + ": " + errno_text(errno));
            }
            if (put == 0) throw EngineError(path_ + ": writing " + what + ": no progress");
            p += put;
            n -= size_t(put);
            offset += uint64_t(put);
        }
    }

    void sync_and_close() {
        if (::fsync(fd_) != 0) throw EngineError(path_ + ": fsync failed: " + errno_text(errno));
        int fd = fd_;
        fd_ = -1;
        if (::close(fd) != 0) throw EngineError(path_ + ": close failed: " + errno_text(errno));
    }

   private:
    int fd_ = -1;
    std::string path_;
};

}  // namespace sku
