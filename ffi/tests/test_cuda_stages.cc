// The CUDA engine's stage schedule, run on the host: every rank's reduce-scatter stages and
// the all-gather, with the device code's own element functions (cuda/stage.h) called for
// every thread index of the launch geometry the engine uses. Checks, for every dtype, op,
// grid, size and alignment:
// - every rank's output equals the plan-order reduction (computed independently, here:
//   fold the group of each dimension in turn), bit for bit;
// - within a stage no rank writes an element that another rank reads or writes, so the
//   ranks' kernels may run at the same time on different devices;
// - a rank writes only its own slice of its staging buffer.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/stage.h"
#include "topology.h"

using namespace jax_ddl;
using jax_ddl::cuda::Geometry;

static int failures = 0;
#define CHECK(cond, ...)                                                              \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      if (failures < 20) {                                                            \
        std::fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                                            \
        std::fprintf(stderr, "\n");                                                   \
      }                                                                               \
      ++failures;                                                                     \
    }                                                                                 \
  } while (0)

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

// Runs one pass (k sources into dst over [begin, end)) as the device would: the geometry
// the engine computes, each thread index in turn; vectorised when every pointer allows.
template <Op kOp, typename A, typename S, typename D>
void Pass(const S* const* srcs, int k, D* dst, int64_t begin, int64_t end) {
  std::vector<const void*> ptrs(srcs, srcs + k);
  ptrs.push_back(dst);
  const bool vec = cuda::CanVectorize(ptrs.data(), k + 1);
  const int64_t v = vec ? cuda::PackElements<S, D, true>() : 1;
  const Geometry g = cuda::PassGeometry(begin, end, v, /*sm_count=*/3);
  if (end > begin) CHECK(g.total() > 0, "no threads for %lld elements", (long long)(end - begin));
  for (int64_t t = 0; t < g.total(); ++t) {
    if (vec) {
      cuda::ReduceSpan<kOp, A, S, D, true>(srcs, k, dst, begin, end, t, g.total());
    } else {
      cuda::ReduceSpan<kOp, A, S, D, false>(srcs, k, dst, begin, end, t, g.total());
    }
  }
}

// Which rank wrote / read an element of a buffer during the current stage.
struct Access {
  std::vector<int> writer, reader;  // -1: nobody; -2: several ranks
  explicit Access(int64_t n) : writer(n, -1), reader(n, -1) {}
  void Mark(std::vector<int>& who, int64_t i, int r) {
    who[i] = who[i] == -1 || who[i] == r ? r : -2;
  }
};

template <Op kOp, typename T>
void RunCase(const std::vector<int64_t>& dims, int64_t count, int offset, std::mt19937& rng) {
  using A = typename AccumOf<T>::type;
  int64_t ranks = 1;
  for (int64_t d : dims) ranks *= d;
  Plan plan;
  std::string err;
  if (!Plan::Make(dims, ranks, &plan, &err)) std::abort();
  const std::string what = FormatTopology(dims) + ", count " + std::to_string(count) + ", offset " +
                           std::to_string(offset) + ", " + std::to_string(sizeof(T)) +
                           "-byte type, op " + std::to_string(static_cast<int>(kOp));
  // Buffers start `offset` elements into their allocation (0: 16-byte aligned).
  std::vector<std::vector<T>> in_mem(ranks, std::vector<T>(count + 8)), out_mem = in_mem;
  std::vector<std::vector<A>> stage_mem(ranks, std::vector<A>(count + 8));
  std::vector<T*> in(ranks), out(ranks);
  std::vector<A*> staging(ranks);
  const A sentinel = static_cast<A>(-12345);
  for (int64_t r = 0; r < ranks; ++r) {
    auto align = [&](auto* p) {
      const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + 15) / 16 * 16;
      return reinterpret_cast<decltype(p)>(a) + offset;
    };
    // std::vector storage is 16-byte aligned on this ABI; align anyway, within the slack.
    in[r] = align(in_mem[r].data());
    out[r] = align(out_mem[r].data());
    staging[r] = align(stage_mem[r].data());
    for (int64_t i = 0; i < count; ++i) in[r][i] = Value<T>(rng), staging[r][i] = sentinel;
  }

  // Elements of a rank's staging that another rank has read in an earlier stage: the rank
  // must never write them again in this call (a slow reader may still be reading them,
  // since a rank waits only for its current group before each stage).
  std::vector<std::vector<char>> foreign_read(ranks, std::vector<char>(count, 0));
  // Reduce-scatter: stage s of rank r reduces its next slice over its group, in plan
  // order, from the peers' inputs (stage 0) or staging (later) into its own staging.
  for (int s = 0; s < plan.num_stages(); ++s) {
    std::vector<Access> stage_access(ranks, Access(count));
    for (int64_t r = 0; r < ranks; ++r) {
      const Range mine = plan.Region(r, s + 1, count);
      const int k = static_cast<int>(plan.dim(s));
      for (int g = 0; g < k; ++g) {
        const int64_t q = plan.Peer(r, s, g);
        for (int64_t i = mine.begin; i < mine.end; ++i) {
          if (s > 0) stage_access[q].Mark(stage_access[q].reader, i, static_cast<int>(r));
        }
      }
      for (int64_t i = mine.begin; i < mine.end; ++i) {
        stage_access[r].Mark(stage_access[r].writer, i, static_cast<int>(r));
      }
      if (s == 0) {
        std::vector<const T*> srcs(k);
        for (int g = 0; g < k; ++g) srcs[g] = in[plan.Peer(r, s, g)];
        Pass<kOp, A, T, A>(srcs.data(), k, staging[r], mine.begin, mine.end);
      } else {
        std::vector<const A*> srcs(k);
        for (int g = 0; g < k; ++g) srcs[g] = staging[plan.Peer(r, s, g)];
        Pass<kOp, A, A, A>(srcs.data(), k, staging[r], mine.begin, mine.end);
      }
    }
    for (int64_t b = 0; b < ranks; ++b) {
      for (int64_t i = 0; i < count; ++i) {
        const int w = stage_access[b].writer[i], rd = stage_access[b].reader[i];
        CHECK(w == -1 || !foreign_read[b][i],
              "%s: stage %d: rank %lld rewrites staging[%lld] that a peer read earlier",
              what.c_str(), s, (long long)b, (long long)i);
        if (rd != -1 && rd != static_cast<int>(b)) foreign_read[b][i] = 1;
      }
    }
    // Concurrency: an element written at this stage is written by one rank and read by
    // no other rank.
    for (int64_t b = 0; b < ranks; ++b) {
      for (int64_t i = 0; i < count; ++i) {
        const int w = stage_access[b].writer[i], rd = stage_access[b].reader[i];
        CHECK(w != -2, "%s: stage %d: staging %lld[%lld] written by several ranks", what.c_str(), s,
              (long long)b, (long long)i);
        CHECK(w == -1 || rd == -1 || rd == w,
              "%s: stage %d: staging %lld[%lld] written by %d, read by %d", what.c_str(), s,
              (long long)b, (long long)i, w, rd);
        CHECK(w == -1 || w == b, "%s: rank %d wrote rank %lld's staging", what.c_str(), w,
              (long long)b);
      }
    }
  }
  // A rank writes only inside the slice it reduces at stage 0 (its largest).
  for (int64_t r = 0; r < ranks; ++r) {
    const Range first = plan.Region(r, 1, count);
    for (int64_t i = 0; i < count; ++i) {
      if (i < first.begin || i >= first.end) {
        CHECK(SameBits(staging[r][i], sentinel), "%s: rank %lld staging[%lld] outside its slice",
              what.c_str(), (long long)r, (long long)i);
      }
    }
  }
  // All-gather: every rank copies each owner's final slice into its output (rounding
  // 16-bit types once).
  for (int64_t r = 0; r < ranks; ++r) {
    for (int64_t o = 0; o < ranks; ++o) {
      const Range slice = plan.Region(o, plan.num_stages(), count);
      const A* src = staging[o];
      Pass<kOp, A, A, T>(&src, 1, out[r], slice.begin, slice.end);
    }
  }

  // Oracle: fold dimension by dimension (acc over c0 in order, then over c1, ...).
  std::vector<std::vector<A>> level(ranks, std::vector<A>(count));
  for (int64_t r = 0; r < ranks; ++r)
    for (int64_t i = 0; i < count; ++i) level[r][i] = Load<A>(in[r][i]);
  for (int s = 0; s < plan.num_stages(); ++s) {
    std::vector<std::vector<A>> next(ranks, std::vector<A>(count));
    for (int64_t r = 0; r < ranks; ++r) {
      for (int64_t i = 0; i < count; ++i) {
        A a = level[plan.Peer(r, s, 0)][i];
        for (int64_t g = 1; g < plan.dim(s); ++g) a = Combine<kOp>(a, level[plan.Peer(r, s, g)][i]);
        next[r][i] = a;
      }
    }
    level.swap(next);
  }
  for (int64_t r = 0; r < ranks; ++r) {
    for (int64_t i = 0; i < count; ++i) {
      const T want = Store<T>(level[r][i]);
      CHECK(SameBits(out[r][i], want), "%s: rank %lld element %lld differs", what.c_str(),
            (long long)r, (long long)i);
      CHECK(SameBits(out[r][i], out[0][i]), "%s: ranks 0 and %lld differ at %lld", what.c_str(),
            (long long)r, (long long)i);
    }
  }
}

template <typename T>
void RunType(std::mt19937& rng) {
  const std::vector<std::vector<int64_t>> grids = {{1},       {2},    {3}, {4, 2},
                                                   {2, 2, 2}, {2, 4}, {8}, {3, 2}};
  const std::vector<int64_t> counts = {0, 1, 3, 7, 8, 9, 17, 100, 1021, 4099};
  for (const auto& dims : grids) {
    for (int64_t count : counts) {
      for (int offset : {0, 1}) {
        RunCase<Op::kSum, T>(dims, count, offset, rng);
        if (count == 1021) {
          RunCase<Op::kMax, T>(dims, count, offset, rng);
          RunCase<Op::kMin, T>(dims, count, offset, rng);
        }
      }
    }
  }
}

static void TestGeometry() {
  CHECK(cuda::StageGeometry(0, 132).blocks == 0, "empty pass launches nothing");
  CHECK(cuda::StageGeometry(-3, 132).blocks == 0, "negative work launches nothing");
  const Geometry one = cuda::StageGeometry(1, 132);
  CHECK(one.blocks == 1 && one.threads == 512, "1 pack: %lld x %lld", (long long)one.blocks,
        (long long)one.threads);
  const Geometry big = cuda::StageGeometry(int64_t{1} << 30, 132);
  CHECK(big.blocks == 4 * 132, "large pass capped at 4 blocks per SM: %lld", (long long)big.blocks);
  for (int64_t packs : {1, 511, 512, 513, 100000}) {
    const Geometry g = cuda::StageGeometry(packs, 132);
    CHECK(g.blocks >= 1 && g.blocks <= 4 * 132, "%lld packs", (long long)packs);
    CHECK(g.blocks == 4 * 132 || g.total() >= packs, "%lld packs, %lld threads", (long long)packs,
          (long long)g.total());
  }
}

int main() {
  TestGeometry();
  std::mt19937 rng(7);
  RunType<float>(rng);
  RunType<double>(rng);
  RunType<int32_t>(rng);
  RunType<int64_t>(rng);
  RunType<bf16_t>(rng);
  RunType<f16_t>(rng);
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("cuda stage schedule: all checks passed\n");
  return 0;
}
