// Reduction kernels of the allreduce: element types (incl. bfloat16/float16 with float32
// accumulation), the ops, and a cache-blocked many-source reduce. Pure C++, no XLA.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace jax_ddl {

enum class Op : int32_t { kSum = 0, kMax = 1, kMin = 2 };

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float ToFloat(bf16_t x) { return BitsFloat(static_cast<uint32_t>(x.bits) << 16); }

// Round to nearest even; NaN stays a quiet NaN of the same sign.
inline bf16_t ToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

inline float ToFloat(f16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24
    return sign ? -v : v;
  }
  if (exp == 31) return BitsFloat(sign | 0x7f800000u | (mant << 13));
  return BitsFloat(sign | ((exp + 112) << 23) | (mant << 13));
}

// Round to nearest even, overflow to infinity, subnormals kept.
inline f16_t ToF16(float f) {
  uint32_t x = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | (x > 0x7f800000u ? 0x7e00 : 0x7c00))};
  if (x >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00)};  // >= 65520
  if (x < 0x38800000u) {  // below 2^-14: a half subnormal (exact scaling, then RNE)
    return f16_t{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(BitsFloat(x) * 16777216.0f)))};
  }
  x += 0xc8000fffu + ((x >> 13) & 1u);  // rebias exponent by -112, round to nearest even
  return f16_t{static_cast<uint16_t>(sign | (x >> 13))};
}

// Accumulator type: 16-bit floats accumulate in float32; everything else in itself.
template <typename T> struct AccumOf { using type = T; };
template <> struct AccumOf<bf16_t> { using type = float; };
template <> struct AccumOf<f16_t> { using type = float; };

template <typename A, typename S> inline A Load(S x) {
  if constexpr (std::is_same_v<S, bf16_t> || std::is_same_v<S, f16_t>) {
    return ToFloat(x);
  } else {
    return static_cast<A>(x);
  }
}
template <typename D, typename A> inline D Store(A x) {
  if constexpr (std::is_same_v<D, bf16_t>) {
    return ToBf16(x);
  } else if constexpr (std::is_same_v<D, f16_t>) {
    return ToF16(x);
  } else {
    return static_cast<D>(x);
  }
}

template <Op kOp, typename A> inline A Combine(A a, A b) {
  if constexpr (kOp == Op::kSum) {
    if constexpr (std::is_integral_v<A>) {  // wraps like XLA, without signed overflow UB
      using U = std::make_unsigned_t<A>;
      return static_cast<A>(static_cast<U>(a) + static_cast<U>(b));
    } else {
      return a + b;
    }
  } else if constexpr (kOp == Op::kMax) {
    return (a > b || a != a) ? a : b;  // NaN propagates
  } else {
    return (a < b || a != a) ? a : b;
  }
}

// dsts[k][i] = srcs[0][i] op srcs[1][i] op ... in source order, accumulated in A, for
// i < n and every destination k. Blocked so the running result stays in L1: memory
// traffic is one read per source and one write per destination. A destination may alias
// a source: each block is read completely before it is written.
template <Op kOp, typename A, typename S, typename D>
void ReduceKernel(const char* const* srcs, int64_t num_srcs, char* const* dsts,
                  int64_t num_dsts, int64_t n) {
  constexpr int64_t kBlock = 8192 / sizeof(A);
  alignas(64) A acc[kBlock];
  alignas(64) D out[std::is_same_v<A, D> ? 1 : kBlock];
  for (int64_t base = 0; base < n; base += kBlock) {
    const int64_t m = n - base < kBlock ? n - base : kBlock;
    const S* s0 = reinterpret_cast<const S*>(srcs[0]) + base;
    for (int64_t i = 0; i < m; ++i) acc[i] = Load<A>(s0[i]);
    for (int64_t q = 1; q < num_srcs; ++q) {
      const S* s = reinterpret_cast<const S*>(srcs[q]) + base;
      for (int64_t i = 0; i < m; ++i) acc[i] = Combine<kOp>(acc[i], Load<A>(s[i]));
    }
    const D* result;
    if constexpr (std::is_same_v<A, D>) {
      result = acc;
    } else {
      for (int64_t i = 0; i < m; ++i) out[i] = Store<D>(acc[i]);
      result = out;
    }
    for (int64_t k = 0; k < num_dsts; ++k) {
      std::memcpy(reinterpret_cast<D*>(dsts[k]) + base, result, m * sizeof(D));
    }
  }
}

// acc[i] = value (first) or acc[i] op value, for a block already in accumulator type.
template <Op kOp, typename A, typename S>
void Accumulate(bool first, const S* src, A* acc, int64_t n) {
  if (first) {
    for (int64_t i = 0; i < n; ++i) acc[i] = Load<A>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] = Combine<kOp>(acc[i], Load<A>(src[i]));
  }
}

}  // namespace jax_ddl
