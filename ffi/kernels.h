// Host reduction kernels of the allreduce: block conversions (F16C where the CPU has it)
// and a cache-blocked many-source reduce over the element code of element.h. Pure C++.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "element.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define JAX_DDL_HAVE_F16C_PATH 1
#endif

namespace jax_ddl {

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
