// Conversions between the stored float dtypes (BF16, F16, F32, F64) and the arithmetic types
// (float, double). Narrowing rounds to nearest even and keeps NaN a NaN, as torch does, so that
// one rounding at the end gives the same bits as the fp32 reference.
//
// Everything here is inline: the hot loops of the engine (and the scalar token-loss path) are
// compiled once per instruction set, and these helpers must inline into each variant.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "error.hpp"
#include "safetensors.hpp"

namespace sku {

inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// bf16 is the top half of an fp32: widening is exact.
inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
    uint32_t x = float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x0040u);  // quiet NaN
    return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float f16_to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) return bits_float(sign | float_bits(float(mantissa) * 0x1p-24f));
    return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// Round to nearest even (after F. Giesen's float_to_half_fast3_rtne).
inline uint16_t float_to_f16(float f) {
    uint32_t x = float_bits(f);
    uint16_t sign = uint16_t((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN
    if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
    if (ax < 0x38800000u)  // below 2^-14: a subnormal half, an integer multiple of 2^-24
        return uint16_t(sign | uint16_t(std::nearbyint(bits_float(ax) * 0x1p24f)));
    ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias the exponent and round
    return uint16_t(sign | (ax >> 13));
}

// out[0..n) = the n stored elements at `raw`, widened to T (float or double).
template <typename T>
void decode(DType dtype, const char* raw, T* out, size_t n) {
    switch (dtype) {
        case DType::F32: {
            const float* p = reinterpret_cast<const float*>(raw);
            for (size_t i = 0; i < n; ++i) out[i] = T(p[i]);
            break;
        }
        case DType::BF16: {
            const uint16_t* p = reinterpret_cast<const uint16_t*>(raw);
            for (size_t i = 0; i < n; ++i) out[i] = T(bf16_to_float(p[i]));
            break;
        }
        case DType::F16: {
            const uint16_t* p = reinterpret_cast<const uint16_t*>(raw);
            for (size_t i = 0; i < n; ++i) out[i] = T(f16_to_float(p[i]));
            break;
        }
        case DType::F64: {
            const double* p = reinterpret_cast<const double*>(raw);
            for (size_t i = 0; i < n; ++i) out[i] = T(p[i]);
            break;
        }
        default: throw internal_error("internal: decode of a non-float dtype");
    }
}

// The n values of `in`, each rounded to `dtype`, stored at `raw`.
template <typename T>
void encode(DType dtype, const T* in, char* raw, size_t n) {
    switch (dtype) {
        case DType::F32: {
            float* p = reinterpret_cast<float*>(raw);
            for (size_t i = 0; i < n; ++i) p[i] = float(in[i]);
            break;
        }
        case DType::BF16: {
            uint16_t* p = reinterpret_cast<uint16_t*>(raw);
            for (size_t i = 0; i < n; ++i) p[i] = float_to_bf16(float(in[i]));
            break;
        }
        case DType::F16: {
            uint16_t* p = reinterpret_cast<uint16_t*>(raw);
            for (size_t i = 0; i < n; ++i) p[i] = float_to_f16(float(in[i]));
            break;
        }
        case DType::F64: {
            double* p = reinterpret_cast<double*>(raw);
            for (size_t i = 0; i < n; ++i) p[i] = double(in[i]);
            break;
        }
        default: throw internal_error("internal: encode to a non-float dtype");
    }
}

// Element i of a stored 16- or 32-bit float buffer, for loops specialised on the dtype.
template <DType D>
inline float load(const char* raw, size_t i) {
    if constexpr (D == DType::F32) {
        float v;
        std::memcpy(&v, raw + 4 * i, 4);
        return v;
    } else {
        uint16_t h;
        std::memcpy(&h, raw + 2 * i, 2);
        return D == DType::BF16 ? bf16_to_float(h) : f16_to_float(h);
    }
}

template <DType O>
inline void store(char* raw, size_t i, float v) {
    if constexpr (O == DType::F32) {
        std::memcpy(raw + 4 * i, &v, 4);
    } else {
        const uint16_t h = O == DType::BF16 ? float_to_bf16(v) : float_to_f16(v);
        std::memcpy(raw + 2 * i, &h, 2);
    }
}

}  // namespace sku
