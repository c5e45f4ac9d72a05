#include "json.hpp"

#include <unordered_set>

#include "error.hpp"

namespace sku {

namespace {

// Deep nesting is never valid in a header; the limit keeps recursion off the stack's edge.
constexpr int kMaxDepth = 64;

class Parser {
   public:
    Parser(std::string_view text, const std::string& where) : s_(text), where_(where) {}

    JsonValue parse_document() {
        skip_ws();
        JsonValue value = parse_value(0);
        skip_ws();
        if (pos_ != s_.size()) fail("unexpected data after the JSON value");
        return value;
    }

   private:
    std::string_view s_;
    const std::string& where_;
    size_t pos_ = 0;

    [[noreturn]] void fail(const std::string& what) const {
        throw format_error(where_ + ": invalid JSON header at byte " + std::to_string(pos_) + ": " +
                           what);
    }

    void skip_ws() {
        while (pos_ < s_.size() &&
               (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
            ++pos_;
    }

    // A byte for a message: printable ASCII as itself, anything else in hex (the message must
    // stay valid UTF-8).
    static std::string describe(char c) {
        const unsigned char u = static_cast<unsigned char>(c);
        if (u >= 0x20 && u < 0x7f) return std::string("character '") + c + "'";
        static const char digits[] = "0123456789ABCDEF";
        return std::string("byte 0x") + digits[u >> 4] + digits[u & 15];
    }

    char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }

    void expect_literal(std::string_view word) {
        if (s_.substr(pos_, word.size()) != word) fail("unknown literal");
        pos_ += word.size();
    }

    JsonValue parse_value(int depth) {
        if (depth > kMaxDepth) fail("nested deeper than " + std::to_string(kMaxDepth));
        if (pos_ >= s_.size()) fail("unexpected end of header");
        JsonValue v;
        char c = s_[pos_];
        if (c == '{') {
            parse_object(v, depth);
        } else if (c == '[') {
            parse_array(v, depth);
        } else if (c == '"') {
            v.kind = JsonValue::Kind::String;
            v.text = parse_string();
        } else if (c == 't') {
            expect_literal("true");
            v.kind = JsonValue::Kind::Bool;
            v.boolean = true;
        } else if (c == 'f') {
            expect_literal("false");
            v.kind = JsonValue::Kind::Bool;
        } else if (c == 'n') {
            expect_literal("null");
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            v.kind = JsonValue::Kind::Number;
            v.text = parse_number();
        } else {
            fail("unexpected " + describe(c));
        }
        return v;
    }

    void parse_object(JsonValue& v, int depth) {
        v.kind = JsonValue::Kind::Object;
        ++pos_;  // '{'
        std::unordered_set<std::string> seen;
        skip_ws();
        if (peek() == '}') {
            ++pos_;
            return;
        }
        while (true) {
            skip_ws();
            if (peek() != '"') fail("expected a string key");
            std::string key = parse_string();
            if (!seen.insert(key).second) fail("duplicate key \"" + key + "\"");
            skip_ws();
            if (peek() != ':') fail("expected ':'");
            ++pos_;
            skip_ws();
            v.members.emplace_back(std::move(key), parse_value(depth + 1));
            skip_ws();
            if (peek() == ',') {
                ++pos_;
            } else if (peek() == '}') {
                ++pos_;
                return;
            } else {
                fail("expected ',' or '}'");
            }
        }
    }

    void parse_array(JsonValue& v, int depth) {
        v.kind = JsonValue::Kind::Array;
        ++pos_;  // '['
        skip_ws();
        if (peek() == ']') {
            ++pos_;
            return;
        }
        while (true) {
            skip_ws();
            v.items.push_back(parse_value(depth + 1));
            skip_ws();
            if (peek() == ',') {
                ++pos_;
            } else if (peek() == ']') {
                ++pos_;
                return;
            } else {
                fail("expected ',' or ']'");
            }
        }
    }

    std::string parse_number() {
        size_t start = pos_;
        if (peek() == '-') ++pos_;
        if (peek() == '0') {
            ++pos_;
        } else if (peek() >= '1' && peek() <= '9') {
            while (peek() >= '0' && peek() <= '9') ++pos_;
        } else {
            fail("malformed number");
        }
        if (peek() == '.') {
            ++pos_;
            if (!(peek() >= '0' && peek() <= '9')) fail("malformed number");
            while (peek() >= '0' && peek() <= '9') ++pos_;
        }
        if (peek() == 'e' || peek() == 'E') {
            ++pos_;
            if (peek() == '+' || peek() == '-') ++pos_;
            if (!(peek() >= '0' && peek() <= '9')) fail("malformed number");
            while (peek() >= '0' && peek() <= '9') ++pos_;
        }
        return std::string(s_.substr(start, pos_ - start));
    }

    unsigned hex4() {
        if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
        unsigned code = 0;
        for (int i = 0; i < 4; ++i) {
            char c = s_[pos_++];
            code <<= 4;
            if (c >= '0' && c <= '9') {
                code |= unsigned(c - '0');
            } else if (c >= 'a' && c <= 'f') {
                code |= unsigned(c - 'a' + 10);
            } else if (c >= 'A' && c <= 'F') {
                code |= unsigned(c - 'A' + 10);
            } else {
                fail("bad \\u escape");
            }
        }
        return code;
    }

    static void append_utf8(std::string& out, unsigned cp) {
        if (cp < 0x80) {
            out += char(cp);
        } else if (cp < 0x800) {
            out += char(0xC0 | (cp >> 6));
            out += char(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += char(0xE0 | (cp >> 12));
            out += char(0x80 | ((cp >> 6) & 0x3F));
            out += char(0x80 | (cp & 0x3F));
        } else {
            out += char(0xF0 | (cp >> 18));
            out += char(0x80 | ((cp >> 12) & 0x3F));
            out += char(0x80 | ((cp >> 6) & 0x3F));
            out += char(0x80 | (cp & 0x3F));
        }
    }

    // Length of the valid UTF-8 sequence starting at pos_, or 0 (overlongs and surrogates refused).
    size_t utf8_length() const {
        auto at = [&](size_t i) { return static_cast<unsigned char>(s_[pos_ + i]); };
        auto cont = [&](size_t i) { return pos_ + i < s_.size() && (at(i) & 0xC0) == 0x80; };
        unsigned char c = at(0);
        if (c < 0x80) return 1;
        if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
        if (c >= 0xE0 && c <= 0xEF) {
            if (!cont(1) || !cont(2)) return 0;
            if (c == 0xE0 && at(1) < 0xA0) return 0;
            if (c == 0xED && at(1) >= 0xA0) return 0;
            return 3;
        }
        if (c >= 0xF0 && c <= 0xF4) {
            if (!cont(1) || !cont(2) || !cont(3)) return 0;
            if (c == 0xF0 && at(1) < 0x90) return 0;
            if (c == 0xF4 && at(1) >= 0x90) return 0;
            return 4;
        }
        return 0;
    }

    std::string parse_string() {
        ++pos_;  // opening quote
        std::string out;
        while (true) {
            if (pos_ >= s_.size()) fail("unterminated string");
            unsigned char c = static_cast<unsigned char>(s_[pos_]);
            if (c == '"') {
                ++pos_;
                return out;
            }
            if (c < 0x20) fail("control character in string");
            if (c == '\\') {
                ++pos_;
                if (pos_ >= s_.size()) fail("unterminated escape");
                char e = s_[pos_++];
                switch (e) {
                    case '"': out += '"'; break;
                    case '\\': out += '\\'; break;
                    case '/': out += '/'; break;
                    case 'b': out += '\b'; break;
                    case 'f': out += '\f'; break;
                    case 'n': out += '\n'; break;
                    case 'r': out += '\r'; break;
                    case 't': out += '\t'; break;
                    case 'u': {
                        unsigned cp = hex4();
                        if (cp >= 0xD800 && cp <= 0xDBFF) {
                            if (s_.substr(pos_, 2) != "\\u") fail("unpaired surrogate");
                            pos_ += 2;
                            unsigned low = hex4();
                            if (low < 0xDC00 || low > 0xDFFF) fail("unpaired surrogate");
                            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                            fail("unpaired surrogate");
                        }
                        append_utf8(out, cp);
                        break;
                    }
                    default: fail("bad escape of " + describe(e));
                }
                continue;
            }
            size_t n = utf8_length();
            if (n == 0) fail("invalid UTF-8");
            out.append(s_.substr(pos_, n));
            pos_ += n;
        }
    }
};

}  // namespace

const JsonValue* JsonValue::find(std::string_view key) const {
    for (const auto& member : members)
        if (member.first == key) return &member.second;
    return nullptr;
}

JsonValue parse_json(std::string_view text, const std::string& where) {
    return Parser(text, where).parse_document();
}

bool json_to_u64(const JsonValue& value, uint64_t& out) {
    if (value.kind != JsonValue::Kind::Number || value.text.empty()) return false;
    uint64_t result = 0;
    for (char c : value.text) {
        if (c < '0' || c > '9') return false;  // sign, fraction or exponent
        uint64_t digit = uint64_t(c - '0');
        if (result > (UINT64_MAX - digit) / 10) return false;
        result = result * 10 + digit;
    }
    out = result;
    return true;
}

}  // namespace sku
