// IEEE binary16 <-> float32 on the host, round to nearest even: the op's float16 activations, scales
// and adapters are converted with these (F16C is not assumed: the portable kernels use them too).
#pragma once

#include <cstdint>
#include <cstring>

namespace slim {

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 113;
      while ((mant & 0x400) == 0) mant <<= 1, --exp;
      bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
    }
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = (x >> 16) & 0x8000;
  const uint32_t abs = x & 0x7FFFFFFF;
  if (abs >= 0x7F800000) return sign | 0x7C00 | (abs > 0x7F800000 ? 0x200 : 0);  // inf, nan
  if (abs >= 0x477FF000) return sign | 0x7C00;                                    // overflow to inf
  if (abs < 0x38800000) {                                                         // subnormal or zero
    if (abs < 0x33000000) return sign;
    const uint32_t e = abs >> 23, m = (abs & 0x7FFFFF) | 0x800000;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return sign | r;
  }
  uint32_t r = abs + 0xC8000FFF + ((abs >> 13) & 1);  // rebias exponent, round to nearest even
  return sign | uint16_t(r >> 13);
}

}  // namespace slim
