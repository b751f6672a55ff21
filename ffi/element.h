// Element types of the allreduce (incl. bfloat16/float16 with float32 accumulation), their
// conversions and the reduction ops, element by element. Compiled for the host and, in
// ffi/cuda/, for the device too, so both engines reduce with the same code.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef __CUDACC__
#define JAX_DDL_HD __host__ __device__
#else
#define JAX_DDL_HD
#endif

namespace jax_ddl {

enum class Op : int32_t { kSum = 0, kMax = 1, kMin = 2 };

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

JAX_DDL_HD inline uint32_t FloatBits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
JAX_DDL_HD inline float BitsFloat(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

JAX_DDL_HD inline float ToFloat(bf16_t x) { return BitsFloat(static_cast<uint32_t>(x.bits) << 16); }

// Round to nearest even; NaN stays a quiet NaN of the same sign.
JAX_DDL_HD inline bf16_t ToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

// float16 <-> float32 without branches (selects only), so the compiler vectorises the
// reduction loops. Every intermediate float is normal, so the results stay exact when
// the thread flushes denormals (XLA's threads may).
JAX_DDL_HD inline float ToFloat(f16_t x) {
  const uint32_t h = x.bits;
  const uint32_t em = (h & 0x7fffu) << 13;  // exponent and mantissa in float position
  const uint32_t exp = em & 0x0f800000u;
  const uint32_t normal = em + (112u << 23);   // rebias 15 -> 127
  const uint32_t special = em + (224u << 23);  // inf / nan: exponent 255
  // Subnormal: 1.m x 2^-14 minus 2^-14, computed in normal floats.
  const uint32_t sub = FloatBits(BitsFloat(em + (113u << 23)) - BitsFloat(113u << 23));
  const uint32_t bits = exp == 0x0f800000u ? special : (exp == 0 ? sub : normal);
  return BitsFloat(bits | ((h & 0x8000u) << 16));
}

// Round to nearest even, overflow to infinity, subnormals kept, NaN stays NaN.
JAX_DDL_HD inline f16_t ToF16(float f) {
  const uint32_t bits = FloatBits(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t a = bits & 0x7fffffffu;
  // Below 2^-14: adding 0.5 (2^-1) lines the half subnormal's bits up at the bottom of
  // the float's mantissa and rounds them to nearest even in hardware.
  const uint32_t sub = FloatBits(BitsFloat(a) + BitsFloat(126u << 23)) - (126u << 23);
  const uint32_t rounded = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // rebias -112, RNE
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;             // nan / inf
  const uint32_t out = a >= 0x477ff000u ? big : (a < 0x38800000u ? sub : rounded);
  return f16_t{static_cast<uint16_t>(out | sign)};
}

// Accumulator type: 16-bit floats accumulate in float32; everything else in itself.
template <typename T>
struct AccumOf {
  using type = T;
};
template <>
struct AccumOf<bf16_t> {
  using type = float;
};
template <>
struct AccumOf<f16_t> {
  using type = float;
};

template <typename A, typename S>
JAX_DDL_HD inline A Load(S x) {
  if constexpr (std::is_same_v<S, bf16_t> || std::is_same_v<S, f16_t>) {
    return ToFloat(x);
  } else {
    return static_cast<A>(x);
  }
}
template <typename D, typename A>
JAX_DDL_HD inline D Store(A x) {
  if constexpr (std::is_same_v<D, bf16_t>) {
    return ToBf16(x);
  } else if constexpr (std::is_same_v<D, f16_t>) {
    return ToF16(x);
  } else {
    return static_cast<D>(x);
  }
}

template <Op kOp, typename A>
JAX_DDL_HD inline A Combine(A a, A b) {
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

}  // namespace jax_ddl
