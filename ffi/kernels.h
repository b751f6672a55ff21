// Reduction kernels of the allreduce: element types (incl. bfloat16/float16 with float32
// accumulation), the ops, and a cache-blocked many-source reduce. Pure C++, no XLA.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define JAX_DDL_HAVE_F16C_PATH 1
#endif

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

// float16 <-> float32 without branches (selects only), so the compiler vectorises the
// reduction loops. Every intermediate float is normal, so the results stay exact when
// the thread flushes denormals (XLA's threads may).
inline float ToFloat(f16_t x) {
  const uint32_t h = x.bits;
  const uint32_t em = (h & 0x7fffu) << 13;  // exponent and mantissa in float position
  const uint32_t exp = em & 0x0f800000u;
  const uint32_t normal = em + (112u << 23);           // rebias 15 -> 127
  const uint32_t special = em + (224u << 23);          // inf / nan: exponent 255
  // Subnormal: 1.m x 2^-14 minus 2^-14, computed in normal floats.
  const uint32_t sub = FloatBits(BitsFloat(em + (113u << 23)) - BitsFloat(113u << 23));
  const uint32_t bits = exp == 0x0f800000u ? special : (exp == 0 ? sub : normal);
  return BitsFloat(bits | ((h & 0x8000u) << 16));
}

// Round to nearest even, overflow to infinity, subnormals kept, NaN stays NaN.
inline f16_t ToF16(float f) {
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

#ifdef JAX_DDL_HAVE_F16C_PATH
// Hardware float16 conversions (F16C: 8 values per instruction), used when the CPU has
// them. Exact like the portable code: vcvtph2ps ignores denormal flushing, and vcvtps2ph
// rounds to nearest even (NaNs stay NaNs, with their payload).
__attribute__((target("avx,f16c"))) inline void HalfToFloatF16C(const f16_t* src, float* dst,
                                                                  int64_t n) {
  const int64_t full = n - n % 8;
  for (int64_t i = 0; i < full; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + i))));
  }
  for (int64_t i = full; i < n; ++i) dst[i] = ToFloat(src[i]);
}
__attribute__((target("avx,f16c"))) inline void FloatToHalfF16C(const float* src, f16_t* dst,
                                                                  int64_t n) {
  const int64_t full = n - n % 8;
  for (int64_t i = 0; i < full; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (int64_t i = full; i < n; ++i) dst[i] = ToF16(src[i]);
}
#endif

// Whether float16 blocks use the hardware conversions; on by default where the CPU has
// them. Tests switch it to cover both paths.
inline bool& UseF16C() {
#ifdef JAX_DDL_HAVE_F16C_PATH
  static bool use = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#else
  static bool use = false;
#endif
  return use;
}

// dst[i] = Load<A>(src[i]) for a block.
template <typename A, typename S>
inline void LoadBlock(const S* src, A* dst, int64_t n) {
#ifdef JAX_DDL_HAVE_F16C_PATH
  if constexpr (std::is_same_v<S, f16_t> && std::is_same_v<A, float>) {
    if (UseF16C()) return HalfToFloatF16C(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = Load<A>(src[i]);
}

// dst[i] = Store<D>(src[i]) for a block.
template <typename D, typename A>
inline void StoreBlock(const A* src, D* dst, int64_t n) {
#ifdef JAX_DDL_HAVE_F16C_PATH
  if constexpr (std::is_same_v<D, f16_t> && std::is_same_v<A, float>) {
    if (UseF16C()) return FloatToHalfF16C(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = Store<D>(src[i]);
}

// dsts[k][i] = srcs[0][i] op srcs[1][i] op ... in source order, accumulated in A, for
// i < n and every destination k. Blocked so the running result stays in L1: memory
// traffic is one read per source and one write per destination. A destination may alias
// a source: each block is read completely before it is written.
template <Op kOp, typename A, typename S, typename D>
void ReduceKernel(const char* const* srcs, int64_t num_srcs, char* const* dsts,
                  int64_t num_dsts, int64_t n) {
  constexpr int64_t kBlock = 8192 / sizeof(A);
  constexpr bool kConvertIn = !std::is_same_v<A, S>;
  constexpr bool kConvertOut = !std::is_same_v<A, D>;
  alignas(64) A acc[kBlock];
  alignas(64) A in[kConvertIn ? kBlock : 1];
  alignas(64) D out[kConvertOut ? kBlock : 1];
  for (int64_t base = 0; base < n; base += kBlock) {
    const int64_t m = n - base < kBlock ? n - base : kBlock;
    LoadBlock<A>(reinterpret_cast<const S*>(srcs[0]) + base, acc, m);
    for (int64_t q = 1; q < num_srcs; ++q) {
      const S* s = reinterpret_cast<const S*>(srcs[q]) + base;
      if constexpr (kConvertIn) {
        LoadBlock<A>(s, in, m);
        for (int64_t i = 0; i < m; ++i) acc[i] = Combine<kOp>(acc[i], in[i]);
      } else {
        for (int64_t i = 0; i < m; ++i) acc[i] = Combine<kOp>(acc[i], s[i]);
      }
    }
    const D* result;
    if constexpr (kConvertOut) {
      StoreBlock<D>(acc, out, m);
      result = out;
    } else {
      result = acc;
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
