#include "safetensors.hpp"

#include <algorithm>
#include <cstring>

#include "error.hpp"
#include "io.hpp"
#include "json.hpp"

namespace sku {

namespace {

// The first bytes of a Git LFS pointer: the weights were never downloaded.
constexpr char kLfsPrefix[] = "version https://git-lfs";

std::string quoted(const std::string& name) { return "\"" + name + "\""; }

TensorInfo parse_tensor(const std::string& path, const std::string& name, const JsonValue& value) {
    std::string where = path + ": tensor " + quoted(name);
    if (value.kind != JsonValue::Kind::Object)
        throw format_error(where + ": entry is not an object");
    const JsonValue* dtype = value.find("dtype");
    const JsonValue* shape = value.find("shape");
    const JsonValue* offsets = value.find("data_offsets");
    if (dtype == nullptr || shape == nullptr || offsets == nullptr)
        throw format_error(where + ": entry needs \"dtype\", \"shape\" and \"data_offsets\"");

    TensorInfo info;
    info.name = name;
    if (dtype->kind != JsonValue::Kind::String || !dtype_from_name(dtype->text, info.dtype))
        throw format_error(where + ": unknown dtype " +
                           (dtype->kind == JsonValue::Kind::String
                                ? quoted(dtype->text)
                                : std::string("(not a string)")));
    if (shape->kind != JsonValue::Kind::Array)
        throw format_error(where + ": shape is not a list");
    for (const auto& dim : shape->items) {
        uint64_t d = 0;
        if (!json_to_u64(dim, d))
            throw format_error(where + ": shape entry " + dim.text +
                               " is not a non-negative integer");
        info.shape.push_back(d);
    }
    // numel * itemsize, checked for overflow (a zero dimension makes any shape empty)
    uint64_t bytes = dtype_size(info.dtype);
    if (std::find(info.shape.begin(), info.shape.end(), 0) != info.shape.end()) bytes = 0;
    for (uint64_t d : info.shape) {
        if (bytes != 0 && d > UINT64_MAX / bytes)
            throw format_error(where + ": shape x dtype size overflows 64 bits");
        bytes *= d;
    }

    if (offsets->kind != JsonValue::Kind::Array || offsets->items.size() != 2 ||
        !json_to_u64(offsets->items[0], info.begin) || !json_to_u64(offsets->items[1], info.end))
        throw format_error(where + ": data_offsets must be two non-negative integers");
    if (info.end < info.begin)
        throw format_error(where + ": data_offsets [" + std::to_string(info.begin) + ", " +
                           std::to_string(info.end) + "] end before they begin");
    if (info.end - info.begin != bytes)
        throw format_error(where + ": shape x dtype size is " + std::to_string(bytes) +
                           " bytes but data_offsets span " + std::to_string(info.end - info.begin));
    return info;
}

}  // namespace

Header read_header(const std::string& path) {
    File file(path, O_RDONLY);
    Header header;
    header.file_size = file.size();
    char prefix[sizeof(kLfsPrefix) - 1];
    if (header.file_size >= sizeof(prefix)) {
        file.read_at(prefix, sizeof(prefix), 0, "the header");
        if (std::memcmp(prefix, kLfsPrefix, sizeof(prefix)) == 0)
            throw format_error(path +
                               ": is a Git LFS pointer file, not the weights (run `git lfs pull`)");
    }
    if (header.file_size < 8)
        throw format_error(path + ": file is " + std::to_string(header.file_size) +
                           " bytes, too short for a safetensors header");
    unsigned char length_bytes[8];
    file.read_at(length_bytes, 8, 0, "the header length");
    uint64_t length = 0;
    for (int i = 7; i >= 0; --i) length = (length << 8) | length_bytes[i];  // little-endian
    if (length > kMaxHeaderBytes)
        throw format_error(path + ": header length " + std::to_string(length) +
                           " exceeds the 100 MB limit");
    if (length > header.file_size - 8)
        throw format_error(path + ": header length " + std::to_string(length) +
                           " runs past the end of the file (" + std::to_string(header.file_size) +
                           " bytes)");
    header.data_start = 8 + length;

    std::string text(length, '\0');
    file.read_at(text.data(), length, 8, "the header");
    JsonValue root = parse_json(text, path);
    if (root.kind != JsonValue::Kind::Object)
        throw format_error(path + ": header is not a JSON object");

    for (const auto& [name, value] : root.members) {
        if (name == "__metadata__") {
            if (value.kind != JsonValue::Kind::Object)
                throw format_error(path + ": __metadata__ is not an object");
            for (const auto& [key, item] : value.members) {
                if (item.kind != JsonValue::Kind::String)
                    throw format_error(path + ": __metadata__ value of " + quoted(key) +
                                       " is not a string");
                header.metadata.emplace_back(key, item.text);
            }
            continue;
        }
        header.tensors.push_back(parse_tensor(path, name, value));
    }

    // Offsets must tile the data section exactly: no gap, no overlap, no trailing bytes.
    std::stable_sort(header.tensors.begin(), header.tensors.end(),
                     [](const TensorInfo& a, const TensorInfo& b) {
                         return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
                     });
    uint64_t expected = 0;
    for (const auto& t : header.tensors) {
        if (t.begin != expected)
            throw format_error(path + ": tensor " + quoted(t.name) + ": data_offsets begin at " +
                               std::to_string(t.begin) + " but the previous tensor ends at " +
                               std::to_string(expected) +
                               (t.begin < expected ? " (overlap)" : " (gap)"));
        expected = t.end;
    }
    uint64_t data_size = header.file_size - header.data_start;
    if (expected != data_size)
        throw format_error(path + ": tensors end at data byte " + std::to_string(expected) +
                           " but the data section has " + std::to_string(data_size) + " bytes" +
                           (expected < data_size ? " (trailing bytes)" : " (file truncated)"));
    return header;
}

}  // namespace sku
