// POSIX file helpers: an owning descriptor and exact positional reads/writes that retry short
// transfers and turn failures into EngineError naming the file.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
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
        if (fd_ < 0) throw io_error(path + ": cannot open: " + errno_text(errno));
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
        if (::fstat(fd_, &st) != 0) throw io_error(path_ + ": cannot stat: " + errno_text(errno));
        return uint64_t(st.st_size);
    }

    // Reads exactly n bytes at offset; a short file is reported with `what` (e.g. the tensor).
    void read_at(void* buffer, size_t n, uint64_t offset, const std::string& what) const {
        auto* p = static_cast<char*>(buffer);
        while (n > 0) {
            ssize_t got = ::pread(fd_, p, n, off_t(offset));
            if (got < 0) {
                if (errno == EINTR) continue;
                throw io_error(path_ + ": reading " + what + ": " + errno_text(errno));
            }
            if (got == 0)
                throw format_error(path_ + ": reading " + what +
                                   ": unexpected end of file at byte " + std::to_string(offset));
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
                throw io_error(path_ + ": writing " + what + ": " + errno_text(errno));
            }
            if (put == 0) throw io_error(path_ + ": writing " + what + ": no progress");
            p += put;
            n -= size_t(put);
            offset += uint64_t(put);
        }
    }

    void sync_and_close() {
        if (::fsync(fd_) != 0) throw io_error(path_ + ": fsync failed: " + errno_text(errno));
        int fd = fd_;
        fd_ = -1;
        if (::close(fd) != 0) throw io_error(path_ + ": close failed: " + errno_text(errno));
    }

   private:
    int fd_ = -1;
    std::string path_;
};

// A read-only view of bytes [offset, offset + n) of a file, mapped for the lifetime of the object.
// Reading through the page cache without copying; unmapping as soon as a chunk is done keeps the
// mapped pages (which count toward RSS) bounded by threads x chunk.
class Mapping {
   public:
    Mapping() = default;
    Mapping(const File& file, uint64_t offset, size_t n, const std::string& what) {
        if (n == 0) return;
        // a file cut short after its header was read would raise SIGBUS instead of an error
        if (offset + n > file.size())
            throw format_error(file.path() + ": reading " + what +
                               ": unexpected end of file at byte " + std::to_string(file.size()));
        static const uint64_t page = uint64_t(::sysconf(_SC_PAGESIZE));
        const uint64_t start = offset - offset % page;
        length_ = n + size_t(offset - start);
        void* p = ::mmap(nullptr, length_, PROT_READ, MAP_PRIVATE | MAP_POPULATE, file.fd(),
                         off_t(start));
        if (p == MAP_FAILED) {  // a file system without mmap (some FUSE mounts): copy instead
            copy_.resize(n);
            file.read_at(copy_.data(), n, offset, what);
            data_ = copy_.data();
            return;
        }
        base_ = p;
        data_ = static_cast<const char*>(p) + (offset - start);
    }
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
    Mapping(Mapping&& other) noexcept
        : base_(other.base_),
          length_(other.length_),
          copy_(std::move(other.copy_)),
          data_(base_ != nullptr ? other.data_ : copy_.data()) {
        other.base_ = nullptr;
    }
    ~Mapping() {
        if (base_ != nullptr) ::munmap(base_, length_);
    }

    const char* data() const { return data_; }

   private:
    void* base_ = nullptr;
    size_t length_ = 0;
    std::vector<char> copy_;
    const char* data_ = nullptr;
};

}  // namespace sku
