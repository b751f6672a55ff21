// The CUDA engine's schedule, run on the host: every rank's steps (cuda/schedule.h: the
// barriers, reduce-scatter passes and the gather the handler enqueues) for two calls in a
// row, in random interleavings that respect the barriers, with the device code's own
// element functions (cuda/stage.h) called for every thread index of the engine's launch
// geometry. Checks, for every dtype, op, grid, size and alignment:
// - every rank's output equals the plan-order reduction (computed independently, here:
//   fold the group of each dimension in turn), bit for bit, in both calls;
// - no two ranks access an element unordered by the barriers with one of them writing
//   (vector clocks), so the ranks' kernels may run at the same time on different devices;
// - the barriers never deadlock and every epoch is passed by every member.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/schedule.h"
#include "cuda/stage.h"
#include "oracle.h"
#include "topology.h"

using namespace jax_ddl;
using jax_ddl::cuda::Geometry;

using testing::SameBits;
using testing::Value;

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

// Happens-before between the ranks' steps, as the barriers order them: vector clocks (a
// rank's clock ticks at every step; passing a barrier joins the clocks its members had
// when they signalled). Every access to a buffer element is checked against the element's
// last write and the reads since: two accesses of different ranks, at least one a write,
// must be ordered, or the ranks' kernels could race on a device.
using Clock = std::vector<int64_t>;

struct Shadow {  // per element of a buffer
  int writer = -1;
  int64_t write_time = 0;
  std::vector<int64_t> read_time;  // per rank: its clock at its last read, 0: none
};

struct Tracker {
  std::vector<std::vector<Shadow>> buffers;
  int64_t ranks;
  std::string* race;
  Tracker(int64_t nbuf, int64_t count, int64_t r, std::string* out) : ranks(r), race(out) {
    buffers.assign(nbuf, std::vector<Shadow>(count));
    for (auto& b : buffers)
      for (auto& e : b) e.read_time.assign(r, 0);
  }
  static bool Before(int rank, int64_t t, const Clock& now) { return t <= now[rank]; }
  void Read(int64_t buf, int64_t i, int r, const Clock& now) {
    Shadow& e = buffers[buf][i];
    if (e.writer >= 0 && e.writer != r && !Before(e.writer, e.write_time, now) && race->empty()) {
      *race = "rank " + std::to_string(r) + " reads buffer " + std::to_string(buf) + "[" +
              std::to_string(i) + "] unordered with rank " + std::to_string(e.writer) + "'s write";
    }
    e.read_time[r] = now[r];
  }
  void Write(int64_t buf, int64_t i, int r, const Clock& now) {
    Shadow& e = buffers[buf][i];
    bool ok = e.writer < 0 || e.writer == r || Before(e.writer, e.write_time, now);
    for (int64_t q = 0; q < ranks; ++q) {
      if (q != r && e.read_time[q] > 0 && !Before(static_cast<int>(q), e.read_time[q], now)) {
        ok = false;
      }
    }
    if (!ok && race->empty()) {
      *race = "rank " + std::to_string(r) + " writes buffer " + std::to_string(buf) + "[" +
              std::to_string(i) + "] unordered with another rank's access";
    }
    e.writer = r, e.write_time = now[r];
    std::fill(e.read_time.begin(), e.read_time.end(), 0);
  }
};

// Runs 2 calls of every rank's schedule (cuda/schedule.h) in a random interleaving that
// respects the barriers, as the ranks' streams might: the data through the device's
// element functions and geometry, the accesses through the race detector. Buffers: the
// inputs of call c of rank r, the staging of r, the output of call c of r.
template <Op kOp, typename T>
void RunCase(const std::vector<int64_t>& dims, int64_t count, int offset, std::mt19937& rng) {
  using A = typename AccumOf<T>::type;
  int64_t ranks = 1;
  for (int64_t d : dims) ranks *= d;
  Plan plan;
  std::string err;
  if (!Plan::Make(dims, ranks, &plan, &err)) std::abort();
  const int calls = 2;
  const std::string what = FormatTopology(dims) + ", count " + std::to_string(count) + ", offset " +
                           std::to_string(offset) + ", " + std::to_string(sizeof(T)) +
                           "-byte type, op " + std::to_string(static_cast<int>(kOp));
  // Buffers start `offset` elements past a 16-byte boundary (0: aligned, vector path).
  auto align = [&](auto* p) {
    const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + 15) / 16 * 16;
    return reinterpret_cast<decltype(p)>(a) + offset;
  };
  std::vector<std::vector<T>> in_mem(calls * ranks, std::vector<T>(count + 16));
  std::vector<std::vector<T>> out_mem = in_mem;
  std::vector<std::vector<A>> stage_mem(ranks, std::vector<A>(count + 16));
  std::vector<T*> in(calls * ranks), out(calls * ranks);
  std::vector<A*> staging(ranks);
  for (int64_t j = 0; j < calls * ranks; ++j) {
    in[j] = align(in_mem[j].data()), out[j] = align(out_mem[j].data());
    for (int64_t i = 0; i < count; ++i) in[j][i] = Value<T>(rng);
  }
  for (int64_t r = 0; r < ranks; ++r) staging[r] = align(stage_mem[r].data());
  auto in_id = [&](int c, int64_t r) { return c * ranks + r; };
  auto stage_id = [&](int64_t r) { return calls * ranks + r; };
  auto out_id = [&](int c, int64_t r) { return calls * ranks + ranks + c * ranks + r; };
  std::string race;
  Tracker tracker(calls * ranks * 2 + ranks, count, ranks, &race);

  std::vector<std::vector<cuda::Step>> steps(ranks);
  for (int64_t r = 0; r < ranks; ++r) steps[r] = cuda::RankSchedule(plan, r, count);
  const int64_t per_call = cuda::BarriersPerCall(plan);
  const int64_t nsteps = static_cast<int64_t>(steps[0].size());
  for (int64_t r = 0; r < ranks; ++r) {
    CHECK(static_cast<int64_t>(steps[r].size()) == nsteps, "%s: ranks differ in step count",
          what.c_str());
  }
  // flag[r][q]: the epoch q last signalled to r, and q's clock then.
  std::vector<std::vector<uint64_t>> flag(ranks, std::vector<uint64_t>(ranks, 0));
  std::vector<std::vector<Clock>> flag_clock(ranks, std::vector<Clock>(ranks, Clock(ranks, 0)));
  std::vector<Clock> clock(ranks, Clock(ranks, 0));
  std::vector<int64_t> pc(ranks, 0);
  std::vector<char> signalled(ranks, 0);
  int64_t barriers_passed = 0;
  for (;;) {
    std::vector<int64_t> runnable;
    bool done = true;
    for (int64_t r = 0; r < ranks; ++r) {
      if (pc[r] >= calls * nsteps) continue;
      done = false;
      const cuda::Step& st = steps[r][pc[r] % nsteps];
      if (st.kind != cuda::Step::Kind::kBarrier) {
        runnable.push_back(r);
        continue;
      }
      const uint64_t epoch = (pc[r] / nsteps) * per_call + st.index + 1;
      if (!signalled[r]) {  // arriving: signal every member (release)
        ++clock[r][r];
        for (int64_t m : st.ranks) {
          if (m == r) continue;
          flag[m][r] = std::max(flag[m][r], epoch);
          flag_clock[m][r] = clock[r];
        }
        signalled[r] = 1;
      }
      bool ready = true;
      for (int64_t m : st.ranks) ready = ready && (m == r || flag[r][m] >= epoch);
      if (ready) runnable.push_back(r);
    }
    if (done) break;
    if (runnable.empty()) {
      CHECK(false, "%s: deadlock: no rank can proceed", what.c_str());
      return;
    }
    const int64_t r = runnable[std::uniform_int_distribution<size_t>(0, runnable.size() - 1)(rng)];
    const cuda::Step& st = steps[r][pc[r] % nsteps];
    const int c = static_cast<int>(pc[r] / nsteps);
    const int ri = static_cast<int>(r);
    ++clock[r][r];
    if (st.kind == cuda::Step::Kind::kBarrier) {  // passing: acquire the members' clocks
      for (int64_t m : st.ranks) {
        if (m == r) continue;
        for (int64_t q = 0; q < ranks; ++q) {
          clock[r][q] = std::max(clock[r][q], flag_clock[r][m][q]);
        }
      }
      signalled[r] = 0;
      ++barriers_passed;
    } else if (st.kind == cuda::Step::Kind::kPass) {
      const int k = static_cast<int>(st.ranks.size());
      CHECK(k >= 1 && k <= cuda::kMaxGroup, "%s: group of %d", what.c_str(), k);
      const bool first = st.pass == cuda::PassKind::kFirst;
      for (int64_t m : st.ranks) {
        for (int64_t i = st.range.begin; i < st.range.end; ++i) {
          tracker.Read(first ? in_id(c, m) : stage_id(m), i, ri, clock[r]);
        }
      }
      for (int64_t i = st.range.begin; i < st.range.end; ++i) {
        tracker.Write(stage_id(r), i, ri, clock[r]);
      }
      if (first) {
        std::vector<const T*> srcs;
        for (int64_t m : st.ranks) srcs.push_back(in[c * ranks + m]);
        Pass<kOp, A, T, A>(srcs.data(), k, staging[r], st.range.begin, st.range.end);
      } else {
        std::vector<const A*> srcs;
        for (int64_t m : st.ranks) srcs.push_back(staging[m]);
        Pass<kOp, A, A, A>(srcs.data(), k, staging[r], st.range.begin, st.range.end);
      }
    } else {  // gather: every owner's final span into this call's output
      CHECK(static_cast<int64_t>(st.spans.size()) == ranks, "%s: gather spans", what.c_str());
      for (int64_t o = 0; o < ranks; ++o) {
        const Range span = st.spans[o];
        for (int64_t i = span.begin; i < span.end; ++i) {
          tracker.Read(stage_id(o), i, ri, clock[r]);
          tracker.Write(out_id(c, r), i, ri, clock[r]);
        }
        const A* src = staging[o];
        Pass<kOp, A, A, T>(&src, 1, out[c * ranks + r], span.begin, span.end);
      }
    }
    ++pc[r];
  }
  CHECK(race.empty(), "%s: %s", what.c_str(), race.c_str());
  CHECK(barriers_passed == calls * ranks * per_call, "%s: %lld barriers passed, expected %lld",
        what.c_str(), (long long)barriers_passed, (long long)(calls * ranks * per_call));

  // Oracle per call: the plan-order reduction (tests/oracle.h).
  for (int c = 0; c < calls; ++c) {
    const std::vector<const T*> inputs(in.begin() + c * ranks, in.begin() + (c + 1) * ranks);
    const std::vector<T> want = testing::PlanOrderReduce<kOp, T>(plan, inputs, count);
    for (int64_t r = 0; r < ranks; ++r) {
      int64_t wrong = 0;
      for (int64_t i = 0; i < count; ++i) {
        wrong += !SameBits(out[c * ranks + r][i], want[i]);
        wrong += !SameBits(out[c * ranks + r][i], out[c * ranks][i]);
      }
      CHECK(wrong == 0, "%s: call %d rank %lld: %lld wrong elements", what.c_str(), c, (long long)r,
            (long long)wrong);
    }
  }
}

template <typename T>
void RunType(std::mt19937& rng) {
  const std::vector<std::vector<int64_t>> grids = {
      {1}, {2}, {3}, {4, 2}, {2, 2, 2}, {2, 4}, {8}, {3, 2}, {1, 4}, {4, 1}, {1, 1}, {2, 1, 3}};
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
  if (testing::Failures()) {
    std::fprintf(stderr, "%d check(s) failed\n", testing::Failures());
    return 1;
  }
  std::printf("cuda stage schedule: all checks passed\n");
  return 0;
}
