// Shared by the CUDA engine's tests (host and device): a CHECK that counts failures, random
// values of every element type, and the oracle, the plan-order reduction computed the
// obvious way (fold each dimension's group in turn, in the accumulator type).
#pragma once

#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "element.h"
#include "topology.h"

namespace jax_ddl {
namespace testing {

inline int& Failures() {
  static int failures = 0;
  return failures;
}

#define CHECK(cond, ...)                                                              \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      if (::jax_ddl::testing::Failures() < 20) {                                      \
        std::fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                                            \
        std::fprintf(stderr, "\n");                                                   \
      }                                                                               \
      ++::jax_ddl::testing::Failures();                                               \
    }                                                                                 \
  } while (0)

// Values whose sums round differently in another order (floats), and integers large
// enough to wrap int32.
template <typename T>
T Value(std::mt19937& rng) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    return ToBf16(std::uniform_real_distribution<float>(-3, 3)(rng));
  } else if constexpr (std::is_same_v<T, f16_t>) {
    return ToF16(std::uniform_real_distribution<float>(-3, 3)(rng));
  } else if constexpr (std::is_floating_point_v<T>) {
    return static_cast<T>(std::uniform_real_distribution<double>(-1e3, 1e3)(rng));
  } else {
    return static_cast<T>(std::uniform_int_distribution<int64_t>(-(1LL << 40), 1LL << 40)(rng));
  }
}

template <typename T>
bool SameBits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// The result every rank must hold: inputs[r] is rank r's buffer of `count` elements;
// returns the reduction over dimension 0 in coordinate order, then over dimension 1, ...,
// in the accumulator type, stored as T once.
template <Op kOp, typename T>
std::vector<T> PlanOrderReduce(const Plan& plan, const std::vector<const T*>& inputs,
                               int64_t count) {
  using A = typename AccumOf<T>::type;
  const int64_t ranks = plan.num_ranks();
  std::vector<std::vector<A>> level(ranks, std::vector<A>(count));
  for (int64_t r = 0; r < ranks; ++r)
    for (int64_t i = 0; i < count; ++i) level[r][i] = Load<A>(inputs[r][i]);
  for (int s = 0; s < plan.num_stages(); ++s) {
    std::vector<std::vector<A>> next(ranks, std::vector<A>(count));
    for (int64_t r = 0; r < ranks; ++r) {
      for (int64_t i = 0; i < count; ++i) {
        A a = level[plan.Peer(r, s, 0)][i];
        for (int64_t g = 1; g < plan.dim(s); ++g) {
          a = Combine<kOp>(a, level[plan.Peer(r, s, g)][i]);
        }
        next[r][i] = a;
      }
    }
    level.swap(next);
  }
  std::vector<T> out(count);  // every rank's row is the same after the last stage
  for (int64_t i = 0; i < count; ++i) out[i] = Store<T>(level[0][i]);
  return out;
}

}  // namespace testing
}  // namespace jax_ddl
