// A small strict JSON reader for safetensors headers: objects keep their key order and refuse
// duplicate keys (the JSON spec leaves those undefined; we treat them as corruption).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sku {

struct JsonValue {
    enum class Kind { Null, Bool, Number, String, Array, Object };
    Kind kind = Kind::Null;
    bool boolean = false;
    std::string text;  // String: the decoded UTF-8 text; Number: the literal as written
    std::vector<JsonValue> items;                             // Array
    std::vector<std::pair<std::string, JsonValue>> members;   // Object, in file order

    const JsonValue* find(std::string_view key) const;
};

// Parses `text` (one JSON value with optional surrounding whitespace). Throws EngineError whose
// message starts with `where` and gives the byte position of the problem.
JsonValue parse_json(std::string_view text, const std::string& where);

// Reads a non-negative integer literal (no sign, fraction or exponent) that fits in 64 bits.
bool json_to_u64(const JsonValue& value, uint64_t& out);

}  // namespace sku
